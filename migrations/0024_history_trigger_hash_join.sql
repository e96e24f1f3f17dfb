-- The history trigger's statement is planned once per session, for the transition tables'
-- sizes of its first run (0020). Its hashed `NOT IN` is hashed only when the plan expects
-- the hash to fit in `work_mem`: a session whose first status update was large (600,000
-- orders at the default 4 MB; an event deletion or a draw on a fresh connection) got the
-- unhashed form, which compares every new row with every old one. A join of new and old
-- rows, with nested loops ruled out for this function, is hashed at every size, and a hash
-- join spills to disk rather than grow past `work_mem`.
CREATE OR REPLACE FUNCTION order_history_on_update() RETURNS trigger LANGUAGE plpgsql
SET enable_nestloop = off AS $$
BEGIN
    INSERT INTO order_history (order_id, status, reason)
    SELECT n.id, n.status, n.reason FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status;
    RETURN NULL;
END $$;
