-- Ticket types: several tiers per event, each with its own price and stock, under the
-- event's `capacity`, which becomes the venue cap over all of them; orders with lines; a
-- per-buyer cap. See README "Ticket types and limits".

CREATE TABLE ticket_types (
    id            UUID PRIMARY KEY,
    event_id      UUID NOT NULL REFERENCES events (id),
    name          TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    price         NUMERIC(12, 2) NOT NULL,
    -- NULL: no stock of its own; only the venue cap (the event's capacity) limits it.
    capacity      INTEGER,
    -- Tickets of this type sold or held; the allocator and the releases keep it, under the
    -- event row's lock, like `events.sold`.
    sold          INTEGER NOT NULL DEFAULT 0,
    -- Most tickets of this type in one order (NULL: only the event's `max_per_order`).
    max_per_order INTEGER,
    -- Most tickets of this type one buyer may hold over all their live orders (NULL: none).
    max_per_buyer INTEGER,
    sales_start   TIMESTAMPTZ,
    sales_end     TIMESTAMPTZ,
    -- Left out of public listings; still sold to whoever knows its id.
    hidden        BOOLEAN NOT NULL DEFAULT false,
    sort_order    INTEGER NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Types are never deleted (tickets and order lines name them), only withdrawn.
    deleted_at    TIMESTAMPTZ,
    CONSTRAINT ticket_types_name_length CHECK (char_length(name) BETWEEN 1 AND 200),
    CONSTRAINT ticket_types_description_length CHECK (char_length(description) <= 5000),
    CONSTRAINT ticket_types_price_non_negative CHECK (price >= 0),
    CONSTRAINT ticket_types_capacity_non_negative CHECK (capacity IS NULL OR capacity >= 0),
    CONSTRAINT ticket_types_sold_non_negative CHECK (sold >= 0),
    -- As on events: whatever the allocator does, the database refuses selling a type over
    -- its own stock.
    CONSTRAINT ticket_types_sold_within_capacity CHECK (capacity IS NULL OR sold <= capacity),
    CONSTRAINT ticket_types_max_per_order_positive CHECK (max_per_order IS NULL OR max_per_order >= 1),
    CONSTRAINT ticket_types_max_per_buyer_positive CHECK (max_per_buyer IS NULL OR max_per_buyer >= 1),
    CONSTRAINT ticket_types_sales_window CHECK (sales_start IS NULL OR sales_end IS NULL OR sales_start < sales_end)
);

CREATE INDEX ticket_types_event ON ticket_types (event_id, sort_order, id);

-- Tickets a buyer may hold over all their live orders for the event (NULL: no cap). The
-- type seed-shaped orders (`{event_id, quantity}`) buy: the event's first type, created
-- with it (NULL once that type is withdrawn).
ALTER TABLE events
    ADD COLUMN max_per_buyer INTEGER CONSTRAINT events_max_per_buyer_positive CHECK (max_per_buyer >= 1),
    ADD COLUMN default_ticket_type_id UUID;

-- Every event has a default type from its creation: "General admission", with no stock of
-- its own, the event's price and no limits but the event's. Made by triggers, so that
-- events inserted by any writer (the api, a script, an operator) can be bought the seed's
-- way. Its id is random (version 4): UUID v7 comes from the application.
CREATE FUNCTION name_default_ticket_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.default_ticket_type_id IS NULL THEN
        NEW.default_ticket_type_id := gen_random_uuid();
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION create_default_ticket_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticket_types (id, event_id, name, price, sold)
    VALUES (NEW.default_ticket_type_id, NEW.id, 'General admission', NEW.price, NEW.sold)
    ON CONFLICT (id) DO NOTHING;
    RETURN NULL;
END
$$;

-- Existing events get theirs here, with everything sold so far counted as theirs.
INSERT INTO ticket_types (id, event_id, name, price, sold, created_at, deleted_at)
SELECT gen_random_uuid(), id, 'General admission', price, sold, created_at, deleted_at FROM events;
UPDATE events e SET default_ticket_type_id = t.id FROM ticket_types t WHERE t.event_id = e.id;

CREATE TRIGGER events_name_default_ticket_type BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION name_default_ticket_type();
CREATE TRIGGER events_create_default_ticket_type AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION create_default_ticket_type();

-- The event's `price` is its default type's price, whichever of the two is edited.
CREATE FUNCTION price_default_ticket_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ticket_types SET price = NEW.price, updated_at = now()
    WHERE id = NEW.default_ticket_type_id AND price IS DISTINCT FROM NEW.price;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_price_default_ticket_type AFTER UPDATE OF price ON events
    FOR EACH ROW WHEN (OLD.price IS DISTINCT FROM NEW.price)
    EXECUTE FUNCTION price_default_ticket_type();

CREATE FUNCTION price_event_of_default_type() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE events SET price = NEW.price, updated_at = now()
    WHERE id = NEW.event_id AND default_ticket_type_id = NEW.id AND price IS DISTINCT FROM NEW.price;
    RETURN NULL;
END
$$;

CREATE TRIGGER ticket_types_price_event AFTER UPDATE OF price ON ticket_types
    FOR EACH ROW WHEN (OLD.price IS DISTINCT FROM NEW.price)
    EXECUTE FUNCTION price_event_of_default_type();

-- Tickets carry their type. No foreign key, for the reason orders have none to events
-- (0008): checking it would lock the type's row once per ticket inserted, the row the
-- allocator updates in the same batch. Only the allocator inserts tickets, of types it has
-- just read under the event's lock, and types are never deleted.
ALTER TABLE tickets ADD COLUMN ticket_type_id UUID;
UPDATE tickets t SET ticket_type_id = e.default_ticket_type_id FROM events e WHERE e.id = t.event_id;
ALTER TABLE tickets ALTER COLUMN ticket_type_id SET NOT NULL;

-- An order's lines, as they were priced when it was placed:
-- `[{"ticket_type_id", "name", "quantity", "unit_price"}]` (`unit_price` a decimal string).
-- Written once with the order and never changed, so they are kept with it: the allocator
-- reads them with the order, without a join. JSON, not JSONB: nothing queries inside them,
-- and text is checked and returned as it is, where JSONB would be parsed on every insert
-- and printed again on every read (measured: BENCHMARKS.md). `quantity` stays the order's
-- ticket count (the sum of the lines); `unit_price` is the single line's price, NULL for
-- several lines.
ALTER TABLE orders ADD COLUMN lines JSON;
UPDATE orders o
SET lines = json_build_array(json_build_object(
        'ticket_type_id', e.default_ticket_type_id, 'name', 'General admission',
        'quantity', o.quantity, 'unit_price', o.unit_price::text))
FROM events e WHERE e.id = o.event_id;
ALTER TABLE orders ALTER COLUMN lines SET NOT NULL;
ALTER TABLE orders ADD CONSTRAINT orders_lines_array CHECK (json_typeof(lines) = 'array');
ALTER TABLE orders ALTER COLUMN unit_price DROP NOT NULL;

-- Which type a refusal is about (`SOLD_OUT`, `BUYER_LIMIT`, `NOT_ON_SALE`), when one is.
ALTER TABLE orders ADD COLUMN reason_ticket_type_id UUID;

-- What the api keeps of an event in memory now includes its types and its buyer cap: a
-- change to either is announced like a change to the event (0007). So is a change of
-- currency, which the api has kept since 0010 but which 0007's list did not name.
-- `UPDATE OF` the columns concerned: the allocator's and the releases' updates of `sold`
-- then skip these triggers without evaluating their conditions row by row.
DROP TRIGGER events_announce_change ON events;
CREATE TRIGGER events_announce_change
    AFTER UPDATE OF name, starts_at, price, max_per_order, deleted_at, max_per_buyer, default_ticket_type_id,
                    currency ON events
    FOR EACH ROW
    WHEN ((OLD.name, OLD.starts_at, OLD.price, OLD.max_per_order, OLD.deleted_at, OLD.max_per_buyer,
           OLD.default_ticket_type_id, OLD.currency)
          IS DISTINCT FROM (NEW.name, NEW.starts_at, NEW.price, NEW.max_per_order, NEW.deleted_at,
                            NEW.max_per_buyer, NEW.default_ticket_type_id, NEW.currency))
    EXECUTE FUNCTION announce_event_change();

CREATE FUNCTION announce_ticket_type_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('event_changes', NEW.event_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER ticket_types_announce_insert AFTER INSERT ON ticket_types
    FOR EACH ROW EXECUTE FUNCTION announce_ticket_type_change();
CREATE TRIGGER ticket_types_announce_change
    AFTER UPDATE OF name, price, max_per_order, max_per_buyer, sales_start, sales_end, hidden, deleted_at
    ON ticket_types
    FOR EACH ROW
    WHEN ((OLD.name, OLD.price, OLD.max_per_order, OLD.max_per_buyer, OLD.sales_start, OLD.sales_end,
           OLD.hidden, OLD.deleted_at)
          IS DISTINCT FROM (NEW.name, NEW.price, NEW.max_per_order, NEW.max_per_buyer, NEW.sales_start,
                            NEW.sales_end, NEW.hidden, NEW.deleted_at))
    EXECUTE FUNCTION announce_ticket_type_change();
