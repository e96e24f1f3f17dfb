-- The worker updates an event's row (its `sold`, serving counter and decision rate) and its
-- ticket types' `sold` in every transaction that decides the event's orders. Packed full,
-- as inserted, their pages had no room for the new row versions, so in a `make bench` spread
-- run (10,000 events) 14% of the event updates and 63% of the ticket type updates could not
-- be HOT: each wrote a row version on another page and an entry in every index. Room on the
-- page, as `event_queues` has (0019), keeps them HOT. Pages written from now on keep it.
ALTER TABLE events SET (fillfactor = 50);
ALTER TABLE ticket_types SET (fillfactor = 50);
