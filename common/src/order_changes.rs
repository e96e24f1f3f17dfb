//! Status changes after allocation, in the database: payment, cancellation and hold expiry.
//! The api (payment webhook, cancel) and the worker (expiry loop) both go through here, so
//! the locking order and the release of tickets are written once.
//!
//! **Locking order.** Every transaction that changes an order's status or an event's `sold`
//! locks the event row first, then the order rows, the order the allocator uses too. Two
//! such transactions can therefore only queue behind each other, never deadlock.
//!
//! **Release.** An order that leaves `PENDING` for anything but `PAID` cancels its tickets
//! and gives them back to their ticket types' and the event's `sold` in the same
//! transaction, so capacity is never lost and never double-counted.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{OrderEvent, OrderStatus, Transition, reason};

/// An order locked for a status change, with what the rules need to know about it.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedOrder {
    pub id: Uuid,
    pub user_id: Uuid,
    pub event_id: Uuid,
    pub status: OrderStatus,
    pub quantity: i32,
    pub total: rust_decimal::Decimal,
    /// `PENDING` and past `expires_at`: the hold is over even if the expiry loop has not
    /// got to it yet.
    pub hold_over: bool,
}

/// Locks the order (event row first, then the order row) inside `tx`. `None` when there is
/// no such order, or when `owner` is given and the order is someone else's.
pub async fn lock(tx: &mut PgConnection, order_id: Uuid, owner: Option<Uuid>) -> sqlx::Result<Option<LockedOrder>> {
    // The event and owner of an order never change, so they can be read before the locks.
    let Some(event_id) = sqlx::query_scalar::<_, Uuid>(
        "SELECT event_id FROM orders WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
    )
    .bind(order_id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    sqlx::query("SELECT 1 FROM events WHERE id = $1 FOR NO KEY UPDATE").bind(event_id).execute(&mut *tx).await?;
    sqlx::query_as::<_, LockedOrder>(
        "SELECT id, user_id, event_id, status, quantity, total,
                status = 'PENDING' AND expires_at <= now() AS hold_over
         FROM orders WHERE id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await
}

/// Applies `event` to a locked order and writes the outcome: the new status (and `reason`),
/// released tickets when the order gives up its hold, and a notification for long-polls.
///
/// A hold that is over is expired first, whatever the event: a payment that arrives after
/// `expires_at` is late even if the expiry loop has not run yet, so the outcome depends on
/// the clock, not on which process got the lock first.
pub async fn apply(
    tx: &mut PgConnection,
    order: &mut LockedOrder,
    event: OrderEvent,
    reason: Option<&str>,
) -> sqlx::Result<Transition> {
    if order.hold_over && event != OrderEvent::HoldExpired {
        move_order(tx, order, OrderEvent::HoldExpired, None).await?;
    }
    move_order(tx, order, event, reason).await
}

async fn move_order(
    tx: &mut PgConnection,
    order: &mut LockedOrder,
    event: OrderEvent,
    reason: Option<&str>,
) -> sqlx::Result<Transition> {
    let transition =
        move_orders(tx, order.event_id, order.status, &[(order.id, order.quantity)], event, reason).await?;
    if let Transition::Moves { to, .. } = transition {
        order.status = to;
        order.hold_over = false;
    }
    Ok(transition)
}

/// Applies `event` to orders of one event that are all in status `from`, locked by the
/// caller (`orders` holds their ids and quantities): writes the new status, releases the
/// tickets when the transition says so, and notifies long-polls on commit.
async fn move_orders(
    tx: &mut PgConnection,
    event_id: Uuid,
    from: OrderStatus,
    orders: &[(Uuid, i32)],
    event: OrderEvent,
    reason: Option<&str>,
) -> sqlx::Result<Transition> {
    let transition = from.apply(event);
    if let Transition::Moves { to, releases_tickets } = transition {
        let ids: Vec<Uuid> = orders.iter().map(|(id, _)| *id).collect();
        sqlx::query("UPDATE orders SET status = $2, reason = $3, updated_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .bind(to)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        if releases_tickets {
            release(tx, event_id, &ids).await?;
        }
        crate::db::notify_order_changes(tx, &ids).await?;
    }
    Ok(transition)
}

/// Cancels the tickets of these orders of one event and gives them back to their types'
/// and the event's `sold`, counted from the tickets cancelled (one statement). The caller
/// holds the event's lock.
async fn release(tx: &mut PgConnection, event_id: Uuid, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "WITH cancelled AS (
             UPDATE tickets SET status = 'CANCELLED' WHERE order_id = ANY($1) AND status = 'ACTIVE'
             RETURNING ticket_type_id
         ),
         per_type AS (SELECT ticket_type_id AS id, count(*) AS released FROM cancelled GROUP BY 1),
         types AS (UPDATE ticket_types t SET sold = t.sold - p.released FROM per_type p WHERE t.id = p.id)
         UPDATE events SET sold = sold - (SELECT coalesce(sum(released), 0) FROM per_type), updated_at = now()
         WHERE id = $2",
    )
    .bind(ids)
    .bind(event_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Expires the holds of one event that are over, at most `limit` of them, in `tx`. Returns
/// the ids of the orders it expired. Safe to run from several workers at once: each waits
/// for the event's lock and then sees only the holds still `PENDING`.
pub async fn expire_event(tx: &mut PgConnection, event_id: Uuid, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query("SELECT 1 FROM events WHERE id = $1 FOR NO KEY UPDATE").bind(event_id).execute(&mut *tx).await?;
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT id, quantity FROM orders
         WHERE event_id = $1 AND status = 'PENDING' AND expires_at <= now()
         ORDER BY id LIMIT $2 FOR UPDATE",
    )
    .bind(event_id)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    move_orders(tx, event_id, OrderStatus::Pending, &rows, OrderEvent::HoldExpired, None).await?;
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

/// Rejects every unpaid order of an event being deleted (`QUEUED` ones before the worker
/// gets to them, `PENDING` ones releasing their tickets), with reason `EVENT_UNAVAILABLE`.
/// The caller holds the event's lock. Returns how many orders were rejected.
pub async fn withdraw_event(tx: &mut PgConnection, event_id: Uuid) -> sqlx::Result<usize> {
    let mut rejected = 0;
    for status in [OrderStatus::Queued, OrderStatus::Pending] {
        let rows: Vec<(Uuid, i32)> = sqlx::query_as(
            "SELECT id, quantity FROM orders WHERE event_id = $1 AND status = $2 ORDER BY id FOR UPDATE",
        )
        .bind(event_id)
        .bind(status)
        .fetch_all(&mut *tx)
        .await?;
        if !rows.is_empty() {
            move_orders(tx, event_id, status, &rows, OrderEvent::EventWithdrawn, Some(reason::EVENT_UNAVAILABLE))
                .await?;
            rejected += rows.len();
        }
    }
    Ok(rejected)
}
