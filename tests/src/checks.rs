//! What must hold whatever happened: every order final, every event consistent.

use std::time::Duration;

use uuid::Uuid;

use crate::TestApp;

impl TestApp {
    /// Waits until no order of this test's database is `QUEUED` (panics after `timeout`).
    pub async fn wait_until_final(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'QUEUED'")
                .fetch_one(&self.db.pool)
                .await
                .expect("count queued orders");
            if queued == 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{queued} orders still QUEUED after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The invariants that must hold for every event whatever happened: `sold` equals the
    /// live tickets and stays within capacity, every `PENDING` or `PAID` order holds exactly
    /// its quantity of live tickets, no other order holds any, and no ticket id repeats.
    /// Returns (capacity, sold).
    /// Sleeps until every `PENDING` hold of the event is past its `expires_at` (for a test that
    /// then steps the worker's expiry loop).
    pub async fn wait_past_holds(&self, event: Uuid) {
        let ends: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT max(expires_at) FROM orders WHERE event_id = $1 AND status = 'PENDING'")
                .bind(event)
                .fetch_one(&self.db.pool)
                .await
                .expect("read the holds");
        if let Some(ends) = ends {
            let left = (ends - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(left + Duration::from_millis(50)).await;
        }
    }

    pub async fn assert_consistent(&self, event: Uuid) -> (i64, i64) {
        let (capacity, sold): (i32, i32) = sqlx::query_as("SELECT capacity, sold FROM events WHERE id = $1")
            .bind(event)
            .fetch_one(&self.db.pool)
            .await
            .expect("read event");
        let (tickets, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT id) FROM tickets WHERE event_id = $1 AND status = 'ACTIVE'",
        )
        .bind(event)
        .fetch_one(&self.db.pool)
        .await
        .expect("count tickets");
        assert_eq!(tickets, distinct, "duplicate ticket ids");
        assert_eq!(i64::from(sold), tickets, "sold counter differs from live tickets");
        assert!(sold <= capacity, "oversold: {sold} > {capacity}");
        let mismatched: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(
            "SELECT o.id, o.status, o.quantity, count(t.id) FILTER (WHERE t.status = 'ACTIVE')
             FROM orders o LEFT JOIN tickets t ON t.order_id = o.id
             WHERE o.event_id = $1 GROUP BY o.id
             HAVING count(t.id) FILTER (WHERE t.status = 'ACTIVE')
                    <> CASE WHEN o.status IN ('PENDING', 'PAID') THEN o.quantity ELSE 0 END",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare tickets with orders");
        assert!(mismatched.is_empty(), "orders whose live tickets do not match their status: {mismatched:?}");
        // Per ticket type: `sold` equals its live tickets, within its own capacity, and the
        // types' `sold` add up to the event's.
        let types: Vec<(Uuid, Option<i32>, i32, i64)> = sqlx::query_as(
            "SELECT tt.id, tt.capacity, tt.sold, count(t.id) FILTER (WHERE t.status = 'ACTIVE')
             FROM ticket_types tt LEFT JOIN tickets t ON t.ticket_type_id = tt.id
             WHERE tt.event_id = $1 GROUP BY tt.id",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("count tickets per type");
        for (id, capacity, type_sold, live) in &types {
            assert_eq!(i64::from(*type_sold), *live, "type {id}: sold differs from its live tickets");
            assert!(capacity.is_none_or(|c| *type_sold <= c), "type {id} oversold: {type_sold} > {capacity:?}");
        }
        let types_sold: i64 = types.iter().map(|(_, _, sold, _)| i64::from(*sold)).sum();
        assert_eq!(types_sold, i64::from(sold), "the types' sold do not add up to the event's");
        // Every live order holds its lines' tickets, type by type, and its quantity is their sum.
        let off_lines: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT o.id FROM orders o
             WHERE o.event_id = $1 AND o.status IN ('PENDING', 'PAID')
               AND (o.quantity <> (SELECT sum((l->>'quantity')::int) FROM json_array_elements(o.lines) l)
                    OR EXISTS (
                        SELECT 1 FROM json_array_elements(o.lines) l
                        WHERE (l->>'quantity')::int <> (SELECT count(*) FROM tickets t WHERE t.order_id = o.id
                              AND t.status = 'ACTIVE' AND t.ticket_type_id = (l->>'ticket_type_id')::uuid)))",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare tickets with order lines");
        assert!(off_lines.is_empty(), "orders whose tickets do not match their lines: {off_lines:?}");
        // Per promo code: `uses` equals its live tickets, within `max_uses`, and each of them
        // is on a line of an order placed with the code that the code applied to.
        let codes: Vec<(Uuid, Option<i32>, i32, i64)> = sqlx::query_as(
            "SELECT c.id, c.max_uses, c.uses, count(t.id) FILTER (WHERE t.status = 'ACTIVE')
             FROM promo_codes c LEFT JOIN tickets t ON t.promo_code_id = c.id
             WHERE c.event_id = $1 GROUP BY c.id",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("count tickets per promo code");
        for (id, max_uses, uses, live) in &codes {
            assert_eq!(i64::from(*uses), *live, "promo code {id}: uses differ from its live tickets");
            assert!(max_uses.is_none_or(|max| *uses <= max), "promo code {id} over-redeemed: {uses} > {max_uses:?}");
        }
        let misfiled: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT t.id FROM tickets t JOIN orders o ON o.id = t.order_id
             WHERE t.event_id = $1 AND t.status = 'ACTIVE'
               AND (t.promo_code_id IS DISTINCT FROM CASE WHEN EXISTS (
                        SELECT 1 FROM json_array_elements(o.lines) l
                        WHERE (l->>'ticket_type_id')::uuid = t.ticket_type_id AND l->>'list_price' IS NOT NULL)
                    THEN o.promo_code_id END)",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare tickets with their orders' promo codes");
        assert!(misfiled.is_empty(), "tickets not under the code their line was sold under: {misfiled:?}");
        let miscounted: Vec<(Uuid, i32, i64)> = sqlx::query_as(
            "SELECT o.id, o.promo_uses, count(t.id) FILTER (WHERE t.promo_code_id IS NOT NULL)
             FROM orders o LEFT JOIN tickets t ON t.order_id = o.id AND t.status = 'ACTIVE'
             WHERE o.event_id = $1 AND o.status IN ('PENDING', 'PAID') GROUP BY o.id
             HAVING o.promo_uses <> count(t.id) FILTER (WHERE t.promo_code_id IS NOT NULL)",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare orders' promo uses with their tickets");
        assert!(
            miscounted.is_empty(),
            "orders whose promo_uses differ from their tickets under the code: {miscounted:?}"
        );
        // The event's queue: its tickets are exactly those of its numbered orders (a number
        // may be skipped, a ticket never counted for an order that was not stored), and no
        // number was given twice.
        let (counted, numbered, given, highest, distinct): (i64, i64, i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT q.tickets, coalesce(sum(o.quantity), 0)::int8, q.issued, max(o.queue_number),
                    count(DISTINCT o.queue_number) - count(o.queue_number)
             FROM event_queues q LEFT JOIN orders o ON o.event_id = q.event_id AND o.queue_number IS NOT NULL
             WHERE q.event_id = $1 GROUP BY q.event_id",
        )
        .bind(event)
        .fetch_one(&self.db.pool)
        .await
        .expect("compare the queue's counters with its orders");
        assert_eq!(counted, numbered, "the queue's tickets differ from its numbered orders'");
        assert!(highest.unwrap_or(0) <= given, "an order numbered past the queue's last number");
        assert_eq!(distinct, 0, "a queue number given twice");
        (i64::from(capacity), i64::from(sold))
    }
}
