-- A projector stopped by an error that is not an event's (a view that blocks the swap of its
-- upgrade rebuild, a read model of a newer release, a bug) recorded the state 'stopped', as a
-- clean shutdown does. `projections status` could not tell them apart and exited 0 for both,
-- so nothing alerted while the projection stood still. Such a stop is now recorded as
-- 'halted' (the error is in last_error); a later clean start and stop overwrites it.
--
-- Upgrading: the check is replaced in the migration's transaction; projection_status is a row
-- per projection, so the check's validation is instant.
ALTER TABLE projection_status
    DROP CONSTRAINT projection_status_state_check,
    ADD CONSTRAINT projection_status_state_check
        CHECK (state IN ('running', 'stopped', 'failed', 'halted'));
