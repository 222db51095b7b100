-- Projections: the runtime state of each projector, for `convstore projections status`.
-- The checkpoints are not here: each read-model schema (rm_<name>, rm_<name>_next) keeps its
-- own checkpoint row, written in the same transaction as its rows, so that a rebuild's swap
-- (a schema rename) moves tables and checkpoint together.

CREATE TABLE projection_status (
    name                text        PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
    state               text        NOT NULL CHECK (state IN ('running', 'stopped', 'failed')),
    -- host:pid:tag of the instance that holds (or last held) the projection's advisory lock
    leader              text,
    leader_since        timestamptz,
    last_error          text,
    last_error_at       timestamptz,
    -- Set when the projection stopped on an event it could not apply; cleared once an
    -- instance applies past it (a fix deployed) or a rebuild replaces the read model.
    failed_event_id     uuid,
    failed_event_type   text,
    failed_stream_id    text,
    failed_checkpoint   text,
    failed_attempts     integer,
    rebuilt_at          timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projection_status_failed_has_event
        CHECK (state <> 'failed' OR failed_checkpoint IS NOT NULL)
);
