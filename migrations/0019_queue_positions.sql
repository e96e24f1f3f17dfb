-- A queued order's place in line, read in O(1): the api gives each order a number in its
-- event's queue when it stores it (a queue number), and the worker keeps, on the event, the
-- highest number it has decided (a serving counter). Place = number - counter. The tickets
-- asked for are counted the same way, so what an event's queue asks for is known at once
-- (queue full: see `QUEUE_DEMAND_FACTOR`).

-- Each event's queue as the api fills it: the last number given to an order, and the tickets
-- asked for by the orders numbered so far. The api's insert statement locks the rows of its
-- orders' events, so counting and refusing are exact; kept apart from `events`, whose row
-- the worker locks while it decides, so storing orders never waits for a decision.
CREATE TABLE event_queues (
    event_id UUID PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    issued   BIGINT NOT NULL DEFAULT 0 CHECK (issued >= 0),
    tickets  BIGINT NOT NULL DEFAULT 0 CHECK (tickets >= 0)
) WITH (fillfactor = 50);

INSERT INTO event_queues (event_id) SELECT id FROM events;

CREATE FUNCTION event_queue_for_new_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_queues (event_id) VALUES (NEW.id);
    RETURN NULL;
END $$;

-- Every event has its queue row, however it was made.
CREATE TRIGGER event_queue AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION event_queue_for_new_event();

-- The order's number in its event's queue (NULL for orders placed before numbers existed).
ALTER TABLE orders ADD COLUMN queue_number BIGINT;

-- The serving counter, the tickets asked for by the orders decided, and the rate the counter
-- moves at, written by the worker with each decision; and the event's own queue-full factor
-- (NULL: the deployment's QUEUE_DEMAND_FACTOR).
ALTER TABLE events
    ADD COLUMN queue_decided    BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN queue_tickets_decided BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN queue_demand_factor DOUBLE PRECISION CHECK (queue_demand_factor BETWEEN 1 AND 10000),
    -- Orders decided per second, smoothed over the last batches; NULL until two batches
    -- came within 30 s of each other.
    ADD COLUMN queue_rate       DOUBLE PRECISION,
    ADD COLUMN queue_decided_at TIMESTAMPTZ;

-- An order's place in line: 1 is the next of its event's orders to be decided. Only a
-- `QUEUED` order with a number has one. Orders of one event from several api processes can
-- be decided a little out of number order, so a place never goes below 1.
CREATE FUNCTION queue_position(status TEXT, number BIGINT, decided BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN status = 'QUEUED' AND number IS NOT NULL THEN greatest(number - decided, 1) END;

-- Seconds until an order at this place is decided, at the event's recent rate (whole seconds,
-- rounded up); NULL while the rate is unknown.
CREATE FUNCTION queue_wait_secs(status TEXT, number BIGINT, decided BIGINT, rate DOUBLE PRECISION) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN rate > 0 THEN ceil(queue_position(status, number, decided) / rate)::bigint END;
