-- The purchase pipeline: the orders table is the outbox of purchase messages, and workers
-- coordinate the spreading of partitions through heartbeats.

-- When the broker confirmed the order's purchase message. NULL means "not known to be in a
-- queue": the re-publisher publishes QUEUED orders that stay in that state too long.
ALTER TABLE orders ADD COLUMN published_at TIMESTAMPTZ;

-- The re-publisher's scan: only orders still waiting for the worker, which are few.
CREATE INDEX orders_queued ON orders (created_at) WHERE status = 'QUEUED';

-- Bounds for text the API stores verbatim.
ALTER TABLE orders ADD CONSTRAINT orders_reason_length CHECK (reason IS NULL OR char_length(reason) <= 200);
ALTER TABLE orders ADD CONSTRAINT orders_idempotency_key_length
    CHECK (idempotency_key IS NULL OR char_length(idempotency_key) BETWEEN 1 AND 255);

-- Live worker processes. Each one refreshes its row every heartbeat; the live rows, ordered
-- by id, decide which partitions each worker prefers (see worker/src/membership.rs).
CREATE TABLE workers (
    id           UUID PRIMARY KEY,
    hostname     TEXT NOT NULL DEFAULT '',
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
