-- After the sell-out: refunds of paid orders, events deleted with their paid orders refunded,
-- and a waiting list served from released tickets. See README "Waiting list" and "Refunds".

-- A paid order can be refunded: its tickets are cancelled and given back.
ALTER TABLE orders DROP CONSTRAINT orders_status_valid;
ALTER TABLE orders ADD CONSTRAINT orders_status_valid
    CHECK (status IN ('QUEUED', 'PENDING', 'PAID', 'REJECTED', 'EXPIRED', 'CANCELLED', 'REFUNDED'));

-- One row per refunded order (never two: the key is the order), written in the transaction
-- that moved the order to REFUNDED. `source`: the payment provider reported it (the money is
-- back already), an admin asked for it, or the event was deleted with `?refund=true` (the
-- provider has to execute the last two; `executed_at` is set when it reports the refund).
CREATE TABLE refunds (
    order_id     UUID PRIMARY KEY REFERENCES orders (id),
    amount       NUMERIC(14, 2) NOT NULL,
    currency     TEXT NOT NULL,
    source       TEXT NOT NULL,
    requested_by UUID REFERENCES users (id),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    executed_at  TIMESTAMPTZ,
    CONSTRAINT refunds_source_valid CHECK (source IN ('PROVIDER', 'ADMIN', 'EVENT_DELETED'))
);

CREATE INDEX refunds_to_execute ON refunds (created_at) WHERE executed_at IS NULL;

-- An event deleted with `?refund=true` whose paid orders are not all refunded yet: it is
-- already deleted (`deleted_at`, off sale), and the refunds go on in batches until none is
-- left; a crash in between leaves this set, and the workers' sweep finishes the job.
ALTER TABLE events ADD COLUMN refunding_since TIMESTAMPTZ;
CREATE INDEX events_refunding ON events (refunding_since) WHERE refunding_since IS NOT NULL;

-- The waiting list: buyers who asked for tickets of a sold-out type, in join order (the id
-- is a UUID v7, so ordering by it is ordering by arrival). Released tickets are offered to
-- the first entries that fit, in the transaction that released them: the entry becomes
-- OFFERED with an order of its own in PENDING (`order_id`). That order being paid makes it
-- PURCHASED; its hold expiring, being cancelled or declined makes it LAPSED (the tickets go
-- on to the next entry). LEFT: the buyer left; CLOSED: the event was deleted.
CREATE TABLE waitlist_entries (
    id             UUID PRIMARY KEY,
    event_id       UUID NOT NULL REFERENCES events (id),
    ticket_type_id UUID NOT NULL REFERENCES ticket_types (id),
    user_id        UUID NOT NULL REFERENCES users (id),
    quantity       INTEGER NOT NULL,
    status         TEXT NOT NULL DEFAULT 'WAITING',
    order_id       UUID REFERENCES orders (id),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT waitlist_quantity_positive CHECK (quantity >= 1),
    CONSTRAINT waitlist_status_valid
        CHECK (status IN ('WAITING', 'OFFERED', 'PURCHASED', 'LAPSED', 'LEFT', 'CLOSED')),
    CONSTRAINT waitlist_offer_has_order CHECK ((status = 'WAITING') = (order_id IS NULL) OR status IN ('LEFT', 'CLOSED'))
);

-- A buyer is on an event's list once at a time (waiting or holding an offer).
CREATE UNIQUE INDEX waitlist_one_per_buyer ON waitlist_entries (event_id, user_id)
    WHERE status IN ('WAITING', 'OFFERED');
-- The offer pass reads an event's waiting entries in join order.
CREATE INDEX waitlist_waiting ON waitlist_entries (event_id, id) WHERE status = 'WAITING';
CREATE INDEX waitlist_user ON waitlist_entries (user_id, id DESC);
CREATE UNIQUE INDEX waitlist_order ON waitlist_entries (order_id) WHERE order_id IS NOT NULL;
