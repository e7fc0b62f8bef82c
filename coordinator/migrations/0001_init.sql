-- The coordinator's state in PostgreSQL (store backend "postgres"). Records are the JSON the
-- sled backend keeps (store/records.rs), in jsonb; the columns beside them are what queries
-- and constraints need. Applied by the coordinator on start (store/postgres/schema.rs).

-- Enrollment tokens, by the SHA-256 of the token (the token itself is never stored).
CREATE TABLE tokens (
    hash      bytea PRIMARY KEY,
    token_id  text NOT NULL,
    rec       jsonb NOT NULL
);
CREATE INDEX tokens_by_id ON tokens (token_id);

CREATE TABLE devices (
    device_id text PRIMARY KEY,
    rec       jsonb NOT NULL
);

-- Every public key a device used (enrolled or rotated to): never accepted twice.
CREATE TABLE device_keys (
    key_hash  bytea PRIMARY KEY,
    device_id text NOT NULL
);

CREATE TABLE last_seen (
    device_id text PRIMARY KEY,
    ms        bigint NOT NULL
);

-- Nonces of calls dated after their acceptance (replay protection across restarts).
CREATE TABLE nonces (
    ts_ms     bigint NOT NULL,
    device_id text NOT NULL,
    nonce     text NOT NULL,
    PRIMARY KEY (ts_ms, device_id, nonce)
);

-- Global checkpoints (safetensors of the shared parameters), never overwritten.
CREATE TABLE checkpoints (
    version   bigint PRIMARY KEY,
    bytes     bytea NOT NULL
);

CREATE SEQUENCE run_ids;
CREATE TABLE runs (
    run_id    bigint PRIMARY KEY,
    rec       jsonb NOT NULL
);

CREATE SEQUENCE round_ids;
CREATE TABLE rounds (
    round_id  bigint PRIMARY KEY,
    rec       jsonb NOT NULL
);

-- Single values: the server optimizer's state, the clock mark.
CREATE TABLE meta (
    key       text PRIMARY KEY,
    value     jsonb NOT NULL
);

CREATE TABLE events (
    id        bigserial PRIMARY KEY,
    ts_ms     bigint NOT NULL,
    kind      text NOT NULL,
    detail    text NOT NULL
);
