-- Promo codes: discounts and access codes, per event. A code's uses are the tickets held or
-- paid under it: each ticket issued under a code names it (`tickets.promo_code_id`), and
-- `promo_codes.uses` is kept by the same statements that keep `sold` (common::sales::tickets),
-- under the event row's lock, so the database refuses more than `max_uses` the way it refuses
-- selling past a capacity.

CREATE TABLE promo_codes (
    id                 UUID PRIMARY KEY,
    event_id           UUID NOT NULL REFERENCES events (id),
    -- As the organizer wrote it; matched case-insensitively.
    code               TEXT NOT NULL,
    -- At most one of the two; neither: an access code (it discounts nothing).
    percent_off        NUMERIC(5, 2),
    -- Per ticket, in the event's currency.
    amount_off         NUMERIC(12, 2),
    -- The types it applies to; NULL: every type of the event.
    ticket_type_ids    UUID[],
    -- Tickets, over all orders (NULL: no limit).
    max_uses           INTEGER,
    -- Tickets, per buyer (NULL: no limit).
    max_uses_per_buyer INTEGER,
    valid_from         TIMESTAMPTZ,
    valid_until        TIMESTAMPTZ,
    -- Tickets held or paid under it now.
    uses               INTEGER NOT NULL DEFAULT 0,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Withdrawn codes stop applying to new orders; orders placed with them keep their price.
    withdrawn_at       TIMESTAMPTZ,
    CONSTRAINT promo_codes_code_shape CHECK (code ~ '^[A-Za-z0-9_-]{3,64}$'),
    CONSTRAINT promo_codes_one_discount CHECK (percent_off IS NULL OR amount_off IS NULL),
    CONSTRAINT promo_codes_percent_range CHECK (percent_off IS NULL OR (percent_off > 0 AND percent_off <= 100)),
    CONSTRAINT promo_codes_amount_positive CHECK (amount_off IS NULL OR amount_off > 0),
    CONSTRAINT promo_codes_max_uses_positive CHECK (max_uses IS NULL OR max_uses >= 1),
    CONSTRAINT promo_codes_max_uses_per_buyer_positive CHECK (max_uses_per_buyer IS NULL OR max_uses_per_buyer >= 1),
    CONSTRAINT promo_codes_window CHECK (valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until),
    CONSTRAINT promo_codes_uses_non_negative CHECK (uses >= 0),
    -- Whatever the allocator does, a code is never used more than its limit.
    CONSTRAINT promo_codes_uses_within_max CHECK (max_uses IS NULL OR uses <= max_uses),
    CONSTRAINT promo_codes_types_bounded CHECK (cardinality(ticket_type_ids) <= 50)
);

-- One live code of a name per event, whatever its case.
CREATE UNIQUE INDEX promo_codes_event_code ON promo_codes (event_id, lower(code)) WHERE withdrawn_at IS NULL;
CREATE INDEX promo_codes_event ON promo_codes (event_id, id);

-- The code an order was placed with (its text as written then), and what it took off the
-- order's total.
ALTER TABLE orders ADD COLUMN promo_code_id UUID REFERENCES promo_codes (id);
ALTER TABLE orders ADD COLUMN promo_code TEXT;
ALTER TABLE orders ADD COLUMN discount NUMERIC(12, 2) NOT NULL DEFAULT 0;
-- Its tickets under the code (those of the lines the code applies to): the uses it takes
-- while it is PENDING or PAID.
ALTER TABLE orders ADD COLUMN promo_uses INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD CONSTRAINT orders_promo_code_named CHECK ((promo_code_id IS NULL) = (promo_code IS NULL));
ALTER TABLE orders ADD CONSTRAINT orders_discount_non_negative CHECK (discount >= 0);
ALTER TABLE orders ADD CONSTRAINT orders_promo_uses_coded
    CHECK (promo_uses >= 0 AND (promo_code_id IS NOT NULL OR promo_uses = 0));
-- A buyer's uses of a code (the per-buyer limit), read from this index alone.
CREATE INDEX orders_promo_code_buyer ON orders (promo_code_id, user_id) INCLUDE (event_id, status, promo_uses)
    WHERE promo_code_id IS NOT NULL;

-- A type sold only on orders that carry a live code naming it (an access code's types),
-- listed only to admins and to holders of such a code.
ALTER TABLE ticket_types ADD COLUMN requires_promo_code BOOLEAN NOT NULL DEFAULT false;
DROP TRIGGER ticket_types_announce_change ON ticket_types;
CREATE TRIGGER ticket_types_announce_change
    AFTER UPDATE OF name, price, max_per_order, max_per_buyer, sales_start, sales_end, hidden, deleted_at,
                    requires_promo_code
    ON ticket_types
    FOR EACH ROW
    WHEN ((OLD.name, OLD.price, OLD.max_per_order, OLD.max_per_buyer, OLD.sales_start, OLD.sales_end,
           OLD.hidden, OLD.deleted_at, OLD.requires_promo_code)
          IS DISTINCT FROM (NEW.name, NEW.price, NEW.max_per_order, NEW.max_per_buyer, NEW.sales_start,
                            NEW.sales_end, NEW.hidden, NEW.deleted_at, NEW.requires_promo_code))
    EXECUTE FUNCTION announce_ticket_type_change();

-- A waiting-list entry may carry a code: its offer is priced under it, if the code is still
-- live then, and takes its uses like an order.
ALTER TABLE waitlist_entries ADD COLUMN promo_code_id UUID REFERENCES promo_codes (id);

-- The code a ticket was issued under (the tickets of the lines the code applies to): a
-- release gives each code back exactly the uses its tickets took.
ALTER TABLE tickets ADD COLUMN promo_code_id UUID;

-- The api keeps an event's live codes in memory with the event (see migration 0007): a change
-- to a code, but for its `uses`, drops the event there (announced by the function that
-- announces a ticket type's change, migration 0012: it names `NEW.event_id`).
CREATE TRIGGER promo_codes_announce_insert AFTER INSERT ON promo_codes
    FOR EACH ROW EXECUTE FUNCTION announce_ticket_type_change();
CREATE TRIGGER promo_codes_announce_change
    AFTER UPDATE OF code, percent_off, amount_off, ticket_type_ids, max_uses, max_uses_per_buyer, valid_from,
                    valid_until, withdrawn_at
    ON promo_codes
    FOR EACH ROW
    WHEN ((OLD.code, OLD.percent_off, OLD.amount_off, OLD.ticket_type_ids, OLD.max_uses, OLD.max_uses_per_buyer,
           OLD.valid_from, OLD.valid_until, OLD.withdrawn_at)
          IS DISTINCT FROM (NEW.code, NEW.percent_off, NEW.amount_off, NEW.ticket_type_ids, NEW.max_uses,
                            NEW.max_uses_per_buyer, NEW.valid_from, NEW.valid_until, NEW.withdrawn_at))
    EXECUTE FUNCTION announce_ticket_type_change();
