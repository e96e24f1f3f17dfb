-- What an organizer expects on day one: a currency on events and orders, a door-staff role,
-- and the indexes of the admin's order and attendee lists.

-- ISO 4217 code of the event's prices (the api checks the code against the standard's
-- list). Events from before this migration were priced in euros, the only currency the
-- documentation ever showed.
ALTER TABLE events ADD COLUMN currency TEXT NOT NULL DEFAULT 'EUR';
ALTER TABLE events ADD CONSTRAINT events_currency_code CHECK (currency ~ '^[A-Z]{3}$');

-- The currency an order was priced in, copied from its event when the order is accepted,
-- like its `unit_price` (an event's later currency change does not rewrite its orders).
-- Every event was in euros until now, so every existing order was too.
ALTER TABLE orders ADD COLUMN currency TEXT NOT NULL DEFAULT 'EUR';
ALTER TABLE orders ADD CONSTRAINT orders_currency_code CHECK (currency ~ '^[A-Z]{3}$');

-- `staff` may scan tickets at the door (POST /check-ins) and nothing else an admin may do.
ALTER TABLE users DROP CONSTRAINT users_role_valid;
ALTER TABLE users ADD CONSTRAINT users_role_valid CHECK (role IN ('user', 'staff', 'admin'));

-- GET /events/{id}/orders: an event's orders, newest first, keyset-paginated by id (the
-- index `orders_event` on event_id alone leaves the sort to do).
CREATE INDEX orders_event_newest ON orders (event_id, id DESC);
DROP INDEX orders_event;

-- GET /events/{id}/attendees: an event's tickets, newest first, the same way.
CREATE INDEX tickets_event_newest ON tickets (event_id, id DESC);
DROP INDEX tickets_event;
