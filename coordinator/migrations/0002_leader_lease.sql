-- The leadership lease: one coordinator at a time runs the round loop. `term` grows each time
-- the lease changes hands; the round loop's writes check it in their transaction (fencing).
CREATE TABLE leader_lease (
    id         integer PRIMARY KEY CHECK (id = 1),
    holder     text NOT NULL,
    term       bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    -- Where devices reach the holder (`server.advertise_url`): followers redirect them there.
    url        text NOT NULL
);
