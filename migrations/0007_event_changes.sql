-- The api keeps what purchases need of an event (name, date, price, per-order limit, not
-- deleted) in memory, so that accepting an order reads nothing from the database. A change
-- to any of those is announced on `event_changes` (the event's id, on commit) and drops the
-- event from every api process's memory. `sold`, which every allocation changes, is not
-- among them.

CREATE FUNCTION announce_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('event_changes', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_announce_change
    AFTER UPDATE ON events
    FOR EACH ROW
    WHEN ((OLD.name, OLD.starts_at, OLD.price, OLD.max_per_order, OLD.deleted_at)
          IS DISTINCT FROM (NEW.name, NEW.starts_at, NEW.price, NEW.max_per_order, NEW.deleted_at))
    EXECUTE FUNCTION announce_event_change();
