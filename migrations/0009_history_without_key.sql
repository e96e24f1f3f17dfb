-- Order history rows are written only by the triggers on `orders` (0003), from the very
-- rows being inserted or updated, and orders are never deleted: the foreign key to
-- `orders` could never fail, yet checking it locked each order's row once more per status
-- change (two history rows per order on the purchase path alone).
ALTER TABLE order_history DROP CONSTRAINT order_history_order_id_fkey;
