-- One account could take (free events) or hold (paid ones) an event's whole stock: events had
-- no per-buyer cap unless one was set. Events are now created with one (`max_per_buyer`: the
-- deployment's DEFAULT_MAX_PER_BUYER, else the event's max_per_order), and are uncapped only
-- when created or edited with `"max_per_buyer": null` on purpose. Events made before had no
-- cap because none was asked for, not on purpose: they get the default too.
UPDATE events SET max_per_buyer = max_per_order WHERE max_per_buyer IS NULL AND deleted_at IS NULL;
