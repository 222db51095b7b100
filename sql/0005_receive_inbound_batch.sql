-- The first step of receive_inbound for a batch of deliveries (conversations/batching.py):
-- for each, read the key (its connection, current conversation, stream version, contact, and
-- whether the message is already stored) and, when the conversation is open, insert the
-- message at its stream's next version with the conversation id and provider filled in. A
-- stream's version is its last event's (see 0006): the deliveries that go in take the next
-- versions of their stream in batch order, so several for one stream in a batch all go in;
-- two of one message (one event id) go in once, as the first of them.
--
-- A function only so that the statement keeps one generic plan: as a prepared statement its
-- array parameters made PostgreSQL plan it anew on every execution (a custom plan cost less
-- than the generic one estimated for an array of unknown length), which took about 1.5 ms of
-- server CPU per statement, more than running it. force_generic_plan applies to the
-- statements inside the function only.
CREATE FUNCTION receive_inbound_batch(
    p_connections text[],
    p_psids text[],
    p_event_ids uuid[],
    p_data text[],
    p_providers text[],
    p_metadata text[]
)
RETURNS TABLE (
    ord bigint,
    appended boolean,
    channel text,
    reopen_policy text,
    reopen_window interval,
    conversation_id uuid,
    stream_id text,
    status text,
    deleted boolean,
    closed_at timestamptz,
    snoozed_until timestamptz,
    snooze_until_reply boolean,
    version bigint,
    contact_id uuid,
    stored_in text
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_connections, p_psids, p_event_ids, p_data, p_providers,
                             p_metadata)
            WITH ORDINALITY AS i(connection, psid, event_id, data, provider, metadata, ord)
    ),
    found AS (
        SELECT i.ord, i.event_id, i.data, i.provider, i.metadata,
               c.channel, c.reopen_policy, c.reopen_window,
               r.conversation_id, r.stream_id,
               v.status, v.deleted, v.closed_at, v.snoozed_until, v.snooze_until_reply,
               (SELECT max(m.stream_version) FROM events m WHERE m.stream_id = r.stream_id)
                   AS version,
               k.contact_id,
               (SELECT e.stream_id FROM events e WHERE e.event_id = i.event_id) AS stored_in
        FROM input i
        JOIN connections c ON c.name = i.connection
        LEFT JOIN stream_reservations r ON r.connection = c.name AND r.psid = i.psid
        LEFT JOIN conversations v ON v.conversation_id = r.conversation_id
        LEFT JOIN contact_keys k ON k.connection = c.name AND k.psid = i.psid
    ),
    chosen AS (
        SELECT f.ord, f.event_id, f.stream_id, f.data, f.metadata, f.conversation_id,
               COALESCE(f.provider, f.channel) AS provider,
               f.version + row_number() OVER (PARTITION BY f.stream_id ORDER BY f.ord)
                   AS new_version
        FROM (
            SELECT DISTINCT ON (g.event_id) g.* FROM found g
            WHERE g.stored_in IS NULL
              AND (g.status = 'open' OR (g.status = 'snoozed' AND NOT g.snooze_until_reply))
              AND EXISTS (SELECT FROM streams s
                          WHERE s.stream_id = g.stream_id AND s.state = 'active')
            ORDER BY g.event_id, g.ord
        ) AS f
    ),
    -- Inserted in stream order, so two batches in flight that share streams wait for each
    -- other's index entries in the same order and cannot deadlock on them. A delivery that
    -- raced another to a version fails the statement (events_stream_version_key), and every
    -- caller in the batch then runs alone.
    appended AS (
        INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
        SELECT h.event_id, h.stream_id, h.new_version, 'conversation', 'MessageReceived',
               h.data::jsonb || jsonb_build_object(
                   'conversation_id', h.conversation_id, 'provider', h.provider),
               h.metadata::jsonb
        FROM chosen h
        ORDER BY h.stream_id, h.new_version
    )
    -- The INSERT runs unreferenced, as every data-modifying WITH does, and inserts exactly the
    -- chosen rows or fails the statement.
    SELECT f.ord, f.ord IN (SELECT h.ord FROM chosen h),
           f.channel, f.reopen_policy, f.reopen_window, f.conversation_id, f.stream_id,
           f.status, f.deleted, f.closed_at, f.snoozed_until, f.snooze_until_reply,
           f.version, f.contact_id, f.stored_in
    FROM found f;
END
$$;
