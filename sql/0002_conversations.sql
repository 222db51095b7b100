-- Conversation identity: channel connections, contacts, and the stream reservation table.
-- These are write-side tables, changed only in the same transaction as the events that cause
-- the change, so they never disagree with the log.

CREATE TABLE connections (
    name            text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    channel         text        NOT NULL
                                CHECK (channel IN ('messenger', 'instagram', 'telegram', 'widget')),
    external_id     text        NOT NULL CHECK (external_id <> ''),
    app_secret      text,
    verify_token    text,
    secret_token    text,
    access_token    text,
    bot_token       text,
    reopen_policy   text        NOT NULL DEFAULT 'new'
                                CHECK (reopen_policy IN ('new', 'reopen-last', 'reopen-within')),
    reopen_window   interval    CHECK ((reopen_policy = 'reopen-within') = (reopen_window IS NOT NULL)),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT connections_channel_external_id_key UNIQUE (channel, external_id)
);

CREATE TABLE contacts (
    contact_id      uuid        PRIMARY KEY,
    -- Set when this contact was merged into another; the surviving contact owns its history.
    merged_into     uuid        REFERENCES contacts (contact_id),
    client_id       text,
    username        text,
    email           text,
    phone           text,
    is_guest        boolean     NOT NULL DEFAULT false,
    registered      boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT contacts_not_merged_into_self CHECK (merged_into IS DISTINCT FROM contact_id)
);

-- A registered client id names one live contact; identification matches on these in order.
CREATE UNIQUE INDEX contacts_client_id_key ON contacts (client_id)
    WHERE client_id IS NOT NULL AND merged_into IS NULL;
CREATE INDEX contacts_username_idx ON contacts (lower(username)) WHERE merged_into IS NULL;
CREATE INDEX contacts_email_idx ON contacts (lower(email)) WHERE merged_into IS NULL;
CREATE INDEX contacts_phone_idx ON contacts (phone) WHERE merged_into IS NULL;

-- Which contact a customer id (PSID, chat id, guest id) of a connection belongs to.
CREATE TABLE contact_keys (
    connection      text        NOT NULL REFERENCES connections (name),
    psid            text        NOT NULL,
    contact_id      uuid        NOT NULL REFERENCES contacts (contact_id),
    PRIMARY KEY (connection, psid)
);
CREATE INDEX contact_keys_contact_idx ON contact_keys (contact_id);

-- Every conversation ever opened, with its status as the write side knows it.
CREATE TABLE conversations (
    conversation_id uuid        PRIMARY KEY,
    stream_id       text        NOT NULL UNIQUE,
    connection      text        NOT NULL REFERENCES connections (name),
    psid            text        NOT NULL,
    contact_id      uuid        NOT NULL REFERENCES contacts (contact_id),
    status          text        NOT NULL CHECK (status IN ('open', 'snoozed', 'closed')),
    deleted         boolean     NOT NULL DEFAULT false,
    opened_at       timestamptz NOT NULL,
    closed_at       timestamptz,
    snoozed_until   timestamptz,
    snooze_until_reply boolean  NOT NULL DEFAULT false
);
-- Invariant 1, stated a second time so no code path can break it: one open conversation a key.
CREATE UNIQUE INDEX conversations_one_open_per_key ON conversations (connection, psid)
    WHERE status IN ('open', 'snoozed');
CREATE INDEX conversations_contact_idx ON conversations (contact_id, opened_at DESC);
CREATE INDEX conversations_key_idx ON conversations (connection, psid, opened_at DESC);

-- The stream reservation table: the key's current conversation. Its primary key makes "one
-- current conversation per key" a database fact; a close keeps the row (the reopen policies
-- need the last conversation) and the next conversation replaces it in the same transaction.
CREATE TABLE stream_reservations (
    connection      text        NOT NULL REFERENCES connections (name),
    psid            text        NOT NULL,
    conversation_id uuid        NOT NULL REFERENCES conversations (conversation_id),
    stream_id       text        NOT NULL,
    reserved_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection, psid)
);
