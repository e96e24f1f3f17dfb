-- The W3C trace context of the request that placed each order (`traceparent`), so that the
-- worker's decision, the re-publisher and the webhook deliveries continue the order's trace.
-- Empty for orders placed before this migration.
ALTER TABLE orders ADD COLUMN traceparent TEXT
    CONSTRAINT orders_traceparent_length CHECK (char_length(traceparent) <= 128);
