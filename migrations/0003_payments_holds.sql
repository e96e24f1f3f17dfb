-- Payments and holds: the order history, payment webhook de-duplication, late payments,
-- and the index the hold-expiry loop scans.

-- Every status an order has had, and when. Written by triggers rather than by each writer,
-- so no code path (api, allocator, payment webhook, expiry, an operator's SQL) can change a
-- status without leaving a trace. Statement-level triggers with transition tables keep the
-- allocator's batch UPDATE to one INSERT.
CREATE TABLE order_history (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id UUID NOT NULL REFERENCES orders (id),
    status   TEXT NOT NULL,
    reason   TEXT,
    at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX order_history_order ON order_history (order_id, id);

CREATE FUNCTION order_history_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_history (order_id, status, reason)
    SELECT n.id, n.status, n.reason FROM new_rows n;
    RETURN NULL;
END $$;

CREATE FUNCTION order_history_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_history (order_id, status, reason)
    SELECT n.id, n.status, n.reason
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status;
    RETURN NULL;
END $$;

CREATE TRIGGER orders_history_insert AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_history_on_insert();

CREATE TRIGGER orders_history_update AFTER UPDATE ON orders
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION order_history_on_update();

-- Orders that existed before this migration start their history here.
INSERT INTO order_history (order_id, status, reason, at)
SELECT id, status, reason, updated_at FROM orders;

-- Payment webhooks already processed, by `webhook-id`: a retried delivery gets the answer
-- the first one got and changes nothing. Rows are written in the transaction that applied
-- the payment, so an id is recorded exactly when its effect is.
CREATE TABLE payment_webhooks (
    webhook_id   TEXT PRIMARY KEY,
    order_id     UUID NOT NULL,
    status_code  SMALLINT NOT NULL,
    response     JSONB,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT payment_webhooks_id_length CHECK (char_length(webhook_id) BETWEEN 1 AND 255)
);

-- Payments confirmed for an order that no longer holds tickets (its hold expired, its
-- owner cancelled it, it was rejected): the money must go back. Operators list them with
-- `GET /api/v1/late-payments` and mark them refunded.
CREATE TABLE late_payments (
    id           UUID PRIMARY KEY,
    order_id     UUID NOT NULL REFERENCES orders (id),
    webhook_id   TEXT NOT NULL,
    order_status TEXT NOT NULL,
    amount       NUMERIC(14, 2) NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at  TIMESTAMPTZ,
    CONSTRAINT late_payments_webhook_key UNIQUE (webhook_id)
);

CREATE INDEX late_payments_to_refund ON late_payments (id) WHERE refunded_at IS NULL;

-- The expiry loop's scan: holds whose time is up.
CREATE INDEX orders_pending_expiry ON orders (expires_at) WHERE status = 'PENDING';
