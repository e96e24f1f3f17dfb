-- Rate limits shared by every api process (log-in per account and per address, sign-up per
-- address), so that N copies of the api behind a load balancer allow what one allows. GCRA:
-- per limit and key, the theoretical arrival time of the next attempt. Unlogged: a crash
-- forgets the allowances (they fill up again within a minute), and writes skip the WAL.
CREATE UNLOGGED TABLE rate_limits (
    name TEXT NOT NULL,
    key  TEXT NOT NULL,
    tat  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, key)
);

-- The clean-up deletes the rows whose allowance is whole again.
CREATE INDEX rate_limits_tat ON rate_limits (tat);
