-- The coordinators that serve devices, one row per incarnation. A device's calls (its round
-- calls apart: those go to the leader) are served by the member its id hashes highest with
-- (rendezvous hashing over `url`). A member renews `expires_at`; one that came close to lapsing
-- joins again as a new incarnation that serves only from `serves_from`, later than every peer's
-- next look at this table, so no two members serve one device at once. Lapsed rows are kept a
-- while: they say who served a device lately, which decides the calls a member accepts.
CREATE TABLE members (
    incarnation bigserial PRIMARY KEY,
    url         text NOT NULL,
    serves_from timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX members_expiry ON members (expires_at);

-- A replica taking a device reads the nonces the previous one kept for it (future-dated calls).
CREATE INDEX nonces_device ON nonces (device_id, ts_ms);
