-- An order the api accepts is its own `QUEUED` change: the order row carries the change's
-- id (drawn from the history's own sequence, so event ids stay `evt_<n>`, unique across
-- both) and the transaction that wrote it (the relay's cursor order). Before, the insert
-- trigger wrote a history row for it as well: one row and three index entries more for
-- every order on the purchase path, repeating what the order row already held.
--
-- Every change is still recorded: the insert trigger writes a history row for any order
-- inserted without a queued change (the waiting list's orders, an operator's SQL), and
-- `order_status_changes` shows both together, oldest first, as `order_history` alone did.
-- Only an order inserted `QUEUED` may carry one (the api's two inserts set both columns).
ALTER TABLE orders ADD COLUMN queued_xid xid8,
                   ADD COLUMN queued_event_id BIGINT,
                   ADD CONSTRAINT orders_queued_change CHECK ((queued_xid IS NULL) = (queued_event_id IS NULL));

-- The relay reads queued changes in its cursor's order, as it reads the history's.
CREATE INDEX orders_queued_changes ON orders (queued_xid, queued_event_id) WHERE queued_event_id IS NOT NULL;

CREATE OR REPLACE FUNCTION order_history_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_history (order_id, status, reason)
    SELECT n.id, n.status, n.reason FROM new_rows n WHERE n.queued_event_id IS NULL;
    RETURN NULL;
END $$;

-- Every status an order has had, oldest first (by `id`).
CREATE VIEW order_status_changes AS
    SELECT queued_event_id AS id, id AS order_id, 'QUEUED'::text AS status, NULL::text AS reason,
           created_at AS at, queued_xid AS xid
    FROM orders WHERE queued_event_id IS NOT NULL
    UNION ALL
    SELECT id, order_id, status, reason, at, xid FROM order_history;
