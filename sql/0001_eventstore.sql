-- The generic event store: streams with a version row each, and the events of every stream.

CREATE TABLE streams (
    stream_id   text        PRIMARY KEY,
    category    text        NOT NULL,
    -- The version of the last event in the stream; the row is the per-stream lock that makes
    -- the expected-version check atomic without any lock shared across streams.
    version     bigint      NOT NULL CHECK (version >= 1),
    state       text        NOT NULL DEFAULT 'active'
                            CHECK (state IN ('active', 'deleted', 'archived')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    position        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Readers order by (transaction_id, position) and stop below the oldest running
    -- transaction (the snapshot-xmin fence), so out-of-order commits are never skipped.
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    category        text        NOT NULL,
    type            text        NOT NULL CHECK (type <> ''),
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_global_order_idx ON events (transaction_id, position);
CREATE INDEX events_recorded_at_idx ON events (recorded_at);
