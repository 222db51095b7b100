-- Keys the server makes for itself and must share: today the key that signs widget guests'
-- tokens when neither the connection's secret token nor CONVSTORE_WIDGET_SECRET gives one.
-- Kept here, every server of a deployment, and the same server after a restart, accepts the
-- tokens any of them handed out; a key made per process locked every guest out at the next
-- restart, or on the next server behind a load balancer. The first server to start makes it
-- (INSERT ... ON CONFLICT DO NOTHING, then read whichever row won).
CREATE TABLE server_keys (
    name        text        PRIMARY KEY,
    key         bytea       NOT NULL CHECK (length(key) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
