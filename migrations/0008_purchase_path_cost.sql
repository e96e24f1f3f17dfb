-- Less work per order on the purchase path (see BENCHMARKS.md for the measurements).

-- The partition the order's purchase message was sent to (api: `partition_of(event_id, N)`).
-- The re-publisher compares it with how far that partition's consumer has got.
ALTER TABLE orders ADD COLUMN partition SMALLINT;

-- How far each partition's consumer has got: the latest `created_at` among the orders it
-- decided (one row per partition, written in each batch's transaction). A `QUEUED` order of
-- that partition created well before it was passed over: its message went missing, and the
-- re-publisher sends it again. This replaces stamping every order when the broker confirms
-- its message (`published_at`, a second write of every order row): `published_at` now only
-- records when the re-publisher last sent an order.
CREATE TABLE partition_progress (
    partition    SMALLINT PRIMARY KEY,
    seen_through TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- No foreign key from orders to events: checking it took a lock on the event's row for
-- every order stored, the one row the worker holds locked while it allocates, so a
-- stampede's inserts and allocations contended on it. The api stores orders only for events
-- it has just found (events are never deleted, only marked `deleted_at`); this trigger keeps
-- an event with orders from being deleted outright, which the key used to refuse.
ALTER TABLE orders DROP CONSTRAINT orders_event_id_fkey;

CREATE FUNCTION refuse_deleting_events_with_orders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM orders WHERE event_id = OLD.id) THEN
        RAISE EXCEPTION 'event % has orders; mark it deleted (deleted_at) instead', OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER events_keep_ordered
    BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_deleting_events_with_orders();
