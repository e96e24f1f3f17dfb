-- The order events relay reads the order history from a cursor instead of marking each
-- change relayed: one row updated per relayed batch instead of one per change (the mark
-- was an UPDATE that changed an indexed predicate, so it wrote a new version of the row
-- and of its index entries).
--
-- A change is ordered by the id of the transaction that wrote it, then by its own id. The
-- relay reads only changes of transactions older than every transaction still running
-- (`pg_snapshot_xmin(pg_current_snapshot())`): those are all final, committed or gone, so
-- no change can appear behind the cursor later. An id alone would not do: ids are drawn
-- when a row is written, not when its transaction commits, so a lower id can become
-- visible after a higher one. One order's changes keep their order, since each is made
-- by a transaction that began writing after the one before it committed, and so has a
-- higher transaction id.
ALTER TABLE order_history ADD COLUMN xid xid8;
-- Changes already relayed fall below the cursor; those still waiting are read first.
UPDATE order_history SET xid = CASE WHEN relayed_at IS NULL THEN pg_current_xact_id() ELSE '1'::xid8 END;
ALTER TABLE order_history ALTER COLUMN xid SET DEFAULT pg_current_xact_id(),
                          ALTER COLUMN xid SET NOT NULL;
DROP INDEX order_history_to_relay;
ALTER TABLE order_history DROP COLUMN relayed_at;
CREATE INDEX order_history_relay_order ON order_history (xid, id);

-- Where the relay stands: the last change it relayed (one row).
CREATE TABLE relay_cursor (
    singleton   BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    xid         xid8 NOT NULL,
    history_id  BIGINT NOT NULL
);
INSERT INTO relay_cursor (xid, history_id) VALUES ('1'::xid8, 9223372036854775807);
