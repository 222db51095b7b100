-- Median first-response time per connection, from a JSON Lines export:
--   convstore replay --category conversation --out events.jsonl
-- For each conversation: the customer's first message, then the first agent reply after it.
WITH events AS (
    SELECT stream, type, data
    FROM read_json('events.jsonl', format = 'newline_delimited',
                   columns = {stream: 'VARCHAR', type: 'VARCHAR', data: 'JSON'})
),
opened AS (
    SELECT stream, data ->> '$.connection' AS connection
    FROM events WHERE type = 'ConversationOpened'
),
first_in AS (
    SELECT stream, min(CAST(data ->> '$.sent_at' AS TIMESTAMPTZ)) AS at
    FROM events WHERE type = 'MessageReceived'
    GROUP BY stream
),
first_out AS (
    SELECT e.stream, min(CAST(e.data ->> '$.sent_at' AS TIMESTAMPTZ)) AS at
    FROM events e JOIN first_in f USING (stream)
    WHERE e.type = 'MessageSent' AND e.data ->> '$.source' = 'agent'
      AND CAST(e.data ->> '$.sent_at' AS TIMESTAMPTZ) >= f.at
    GROUP BY e.stream
)
SELECT o.connection,
       count(*) AS answered_conversations,
       median(epoch(fo.at) - epoch(fi.at)) AS median_first_response_seconds
FROM opened o
JOIN first_in fi USING (stream)
JOIN first_out fo USING (stream)
GROUP BY o.connection
ORDER BY o.connection;
