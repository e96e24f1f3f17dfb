-- Results to clients and consumers: the order history doubles as the outbox of order
-- events, relayed by the worker to the `orders.events` exchange and to users' webhook
-- endpoints; deliveries and their attempts are durable rows.

-- NULL until the relay published the change and created its webhook deliveries.
ALTER TABLE order_history ADD COLUMN relayed_at TIMESTAMPTZ;
-- Changes from before this migration were never announced and will not be now.
UPDATE order_history SET relayed_at = now();
CREATE INDEX order_history_to_relay ON order_history (id) WHERE relayed_at IS NULL;

CREATE TABLE webhook_endpoints (
    id              UUID PRIMARY KEY,
    user_id         UUID NOT NULL REFERENCES users (id),
    url             TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    -- `whsec_<base64>`: the worker signs with it, so it is kept (shown to the user once).
    secret          TEXT NOT NULL,
    enabled         BOOLEAN NOT NULL DEFAULT true,
    disabled_reason TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_url_length CHECK (char_length(url) BETWEEN 1 AND 2000),
    CONSTRAINT webhook_endpoints_description_length CHECK (char_length(description) <= 500)
);

CREATE INDEX webhook_endpoints_user ON webhook_endpoints (user_id, id DESC);

-- One message to one endpoint. Its id is the `webhook-id` header, the same on every retry;
-- `payload` is the exact body, so every attempt sends (and signs) the same bytes.
CREATE TABLE webhook_deliveries (
    id              UUID PRIMARY KEY,
    endpoint_id     UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    order_id        UUID NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'PENDING',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    -- A worker sending it holds a lease; another worker takes it only once the lease ran out.
    lease_id        UUID,
    leased_until    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT webhook_deliveries_status_valid CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'ABANDONED'))
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id DESC);

CREATE TABLE webhook_attempts (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  UUID NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- NULL when no HTTP answer came (timeout, refused connection, address not allowed).
    status_code  SMALLINT,
    latency_ms   INTEGER NOT NULL,
    error        TEXT
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
