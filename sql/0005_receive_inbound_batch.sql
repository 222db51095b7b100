-- The first step of receive_inbound for a batch of deliveries (conversations/batching.py):
-- for each, read the key (its connection, current conversation, stream version, contact, and
-- whether the message is already stored) and, when the conversation is open, move its stream
-- one version on and insert the message with the conversation id and provider filled in.
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
               s.version, k.contact_id,
               (SELECT e.stream_id FROM events e WHERE e.event_id = i.event_id) AS stored_in
        FROM input i
        JOIN connections c ON c.name = i.connection
        LEFT JOIN stream_reservations r ON r.connection = c.name AND r.psid = i.psid
        LEFT JOIN conversations v ON v.conversation_id = r.conversation_id
        LEFT JOIN streams s ON s.stream_id = r.stream_id
        LEFT JOIN contact_keys k ON k.connection = c.name AND k.psid = i.psid
        -- Streams are moved in this order, so two batches in flight that share streams lock
        -- them in the same order and cannot deadlock on them.
        ORDER BY r.stream_id
    ),
    -- Two deliveries for one stream cannot both move it: an UPDATE moves a row once per
    -- statement. The other comes back not appended, and its caller takes the general path.
    bumped AS (
        UPDATE streams s SET version = s.version + 1, updated_at = now()
        FROM found f
        WHERE s.stream_id = f.stream_id AND s.version = f.version AND s.state = 'active'
          AND f.stored_in IS NULL
          AND (f.status = 'open' OR (f.status = 'snoozed' AND NOT f.snooze_until_reply))
        RETURNING s.stream_id, s.version, f.ord
    ),
    appended AS (
        INSERT INTO events (event_id, stream_id, stream_version, category, type, data, metadata)
        SELECT f.event_id, b.stream_id, b.version, 'conversation', 'MessageReceived',
               f.data::jsonb || jsonb_build_object(
                   'conversation_id', f.conversation_id,
                   'provider', COALESCE(f.provider, f.channel)),
               f.metadata::jsonb
        FROM bumped b JOIN found f ON f.ord = b.ord
        ORDER BY b.ord
    )
    -- Two deliveries of one message share an event id, so "appended" is told by position in
    -- the batch. (The INSERT runs unreferenced, as every data-modifying WITH does, and inserts
    -- exactly the moved rows or fails the statement.)
    SELECT f.ord, f.ord IN (SELECT b.ord FROM bumped b),
           f.channel, f.reopen_policy, f.reopen_window, f.conversation_id, f.stream_id,
           f.status, f.deleted, f.closed_at, f.snoozed_until, f.snooze_until_reply,
           f.version, f.contact_id, f.stored_in
    FROM found f;
END
$$;
