-- A stream's version is the highest stream_version of its events; UNIQUE (stream_id,
-- stream_version) makes an expected-version check atomic, as the version row did. Writing that
-- row on every append cost a second row write per event (conversation ingest went from
-- 0.32-0.42 of a plain INSERT to 0.34-0.51 without it, in quick bench runs), so streams keep
-- only what is written once or rarely: the category, the state and the times.
ALTER TABLE streams DROP COLUMN version;
