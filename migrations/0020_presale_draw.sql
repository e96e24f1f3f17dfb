-- A pre-sale queue drawn by lot. An event may have `sales_start` (no ticket type sells before
-- it) and `prequeue_opens_at` (before it): orders that arrive between the two are stored
-- `QUEUED` without a number (pre-sale entries, not sent to the worker). At `sales_start` one
-- draw numbers them in a random order anyone can check: entries sorted by
-- SHA-256(draw_seed || the order id's 16 bytes), ascending. The seed is made before the
-- pre-sale opens and shown only as its SHA-256 until the opening.

ALTER TABLE events
    ADD COLUMN sales_start       TIMESTAMPTZ,
    ADD COLUMN prequeue_opens_at TIMESTAMPTZ,
    ADD COLUMN draw_seed         BYTEA,
    -- When the draw numbered the entries, and how many there were.
    ADD COLUMN drawn_at          TIMESTAMPTZ,
    ADD COLUMN draw_entries      INT,
    ADD CONSTRAINT events_prequeue_before_sales_start
        CHECK (prequeue_opens_at IS NULL OR (sales_start IS NOT NULL AND prequeue_opens_at < sales_start)),
    ADD CONSTRAINT events_prequeue_has_seed CHECK (prequeue_opens_at IS NULL OR octet_length(draw_seed) = 32);

-- Whether the event's pre-sale entries wait for their draw. Kept on the queue row, which the
-- api's insert statement locks: while it is true, an order that is not an entry is not
-- numbered (the api runs the draw first), and an entry is stored unnumbered; the draw sets
-- it false under the same lock, so no entry comes after it and no number before.
ALTER TABLE event_queues ADD COLUMN draw_pending BOOLEAN NOT NULL DEFAULT false;

-- A pre-sale entry (placed in the pre-sale window); its queue number comes from the draw.
ALTER TABLE orders ADD COLUMN presale_entry BOOLEAN NOT NULL DEFAULT false;

-- One open entry per buyer and event.
CREATE UNIQUE INDEX orders_one_presale_entry ON orders (event_id, user_id)
    WHERE presale_entry AND queue_number IS NULL AND status = 'QUEUED';

-- The worker decides an event's drawn entries before any later order of it: it finds those
-- still undecided here, in number order.
CREATE INDEX orders_drawn_entries ON orders (event_id, queue_number)
    WHERE presale_entry AND queue_number IS NOT NULL AND status = 'QUEUED';

-- The draw's order of an event's entries: the key each is sorted by.
CREATE FUNCTION draw_key(seed BYTEA, order_id UUID) RETURNS BYTEA
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN sha256(seed || uuid_send(order_id));

-- The worker's draw loop looks for these each second.
CREATE INDEX event_queues_draw_pending ON event_queues (event_id) WHERE draw_pending;

-- An event made with a pre-sale waits for its draw from the start.
CREATE OR REPLACE FUNCTION event_queue_for_new_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_queues (event_id, draw_pending) VALUES (NEW.id, NEW.prequeue_opens_at IS NOT NULL);
    RETURN NULL;
END $$;

-- The history trigger's statement is planned once per session, with the transition tables'
-- sizes of its first run: a join of new and old rows planned for one row became a nested
-- loop that took seconds on the 10,000 rows of a draw's decisions. A hashed NOT IN is
-- linear at every size.
CREATE OR REPLACE FUNCTION order_history_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_history (order_id, status, reason)
    SELECT n.id, n.status, n.reason FROM new_rows n
    WHERE (n.id, n.status) NOT IN (SELECT o.id, o.status FROM old_rows o);
    RETURN NULL;
END $$;

-- The api's catalogue reads an event's sale window too: a change of it is announced.
DROP TRIGGER events_announce_change ON events;
CREATE TRIGGER events_announce_change
    AFTER UPDATE OF name, starts_at, price, max_per_order, deleted_at, max_per_buyer, default_ticket_type_id,
                    currency, sales_start, prequeue_opens_at ON events
    FOR EACH ROW
    WHEN ((OLD.name, OLD.starts_at, OLD.price, OLD.max_per_order, OLD.deleted_at, OLD.max_per_buyer,
           OLD.default_ticket_type_id, OLD.currency, OLD.sales_start, OLD.prequeue_opens_at)
          IS DISTINCT FROM (NEW.name, NEW.starts_at, NEW.price, NEW.max_per_order, NEW.deleted_at,
                            NEW.max_per_buyer, NEW.default_ticket_type_id, NEW.currency, NEW.sales_start,
                            NEW.prequeue_opens_at))
    EXECUTE FUNCTION announce_event_change();
