-- The global order (transaction_id, position) becomes the primary key, and the btree on
-- position alone goes. Every read of the log and every checkpoint follows the global order,
-- so the btree on position was paid by every append and read by one lookup: the replay
-- command's --after-position, which a BRIN index serves, since positions grow with the table.
-- In the bench's single-event append at 8 connections this cut about 65 bytes of WAL per
-- event, and the median ratio to the plain INSERT of five paired runs went from 0.72 to 0.76.
-- Positions stay unique: the identity column is GENERATED ALWAYS, so only its sequence
-- fills it.
--
-- The BRIN ranges are 8 pages: with the default 128 the planner costed the BRIN lookup above a
-- whole scan of the primary key (0.35 ms against 3.8 ms, measured on 200k events).
-- autosummarize, so a lookup of a recent position reads few unsummarized pages.
CREATE UNIQUE INDEX events_global_order_key ON events (transaction_id, position);
ALTER TABLE events DROP CONSTRAINT events_pkey;
DROP INDEX events_global_order_idx;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY USING INDEX events_global_order_key;
CREATE INDEX events_position_brin ON events USING brin (position)
    WITH (pages_per_range = 8, autosummarize = on);
