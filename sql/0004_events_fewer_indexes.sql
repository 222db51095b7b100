-- Every index on events is paid by every append. Nothing reads events by recorded_at through
-- an index (replay and time travel walk the global order and filter), so this one only cost
-- append throughput.
DROP INDEX events_recorded_at_idx;
