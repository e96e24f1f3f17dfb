//! Status changes after allocation, in the database: payment, cancellation, hold expiry,
//! refunds and an event's withdrawal. The api (payment webhook, cancel, refund, deletion)
//! and the worker (expiry loop, unfinished deletions) both go through here, each under an
//! [`EventLock`], so the release of tickets and the waiting list's offers are written once.
//!
//! **Release.** An order that leaves `PENDING` for anything but `PAID`, or `PAID` for
//! `REFUNDED`, cancels its tickets and gives them back to their ticket types' and the
//! event's `sold` in the same transaction ([`tickets::release`]), so capacity is never lost
//! and never double-counted; the released tickets are then offered to the event's waiting
//! list ([`waitlist`]), still in that transaction, before any purchase decided after it.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{EventLock, lock_event, tickets, waitlist};
use crate::domain::{OrderStatus, OrderTrigger, Transition, reason};

/// An order locked for a status change (its event's lock, then its row's), with what the
/// rules need to know about it.
#[derive(Debug)]
pub struct LockedOrder<'c> {
    /// Its event's lock; further statements of the transaction go through `lock.conn()`.
    pub lock: EventLock<'c>,
    pub order: OrderRow,
}

/// The locked order's row.
#[derive(Debug)]
pub struct OrderRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub event_id: Uuid,
    pub status: OrderStatus,
    pub quantity: i32,
    pub total: rust_decimal::Decimal,
    pub currency: String,
    /// `PENDING` and past `expires_at`: the hold is over even if the expiry loop has not
    /// got to it yet.
    pub hold_over: bool,
    /// A pre-sale entry not drawn yet (its owner may still withdraw it).
    pub open_entry: bool,
}

/// Locks the order (event row first, then the order row) inside the transaction on `conn`.
/// `None` when there is no such order, or when `owner` is given and the order is someone
/// else's.
pub async fn lock(
    conn: &mut PgConnection,
    order_id: Uuid,
    owner: Option<Uuid>,
) -> sqlx::Result<Option<LockedOrder<'_>>> {
    // The event and owner of an order never change, so they can be read before the locks.
    let Some(event_id) = sqlx::query_scalar!(
        "SELECT event_id FROM orders WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        order_id,
        owner
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let Some(mut lock) = lock_event(conn, event_id).await? else { return Ok(None) };
    let order = sqlx::query_as!(
        OrderRow,
        r#"SELECT id, user_id, event_id, status AS "status: OrderStatus", quantity, total, currency,
                  coalesce(status = 'PENDING' AND expires_at <= now(), false) AS "hold_over!",
                  presale_entry AND queue_number IS NULL AS "open_entry!"
           FROM orders WHERE id = $1 FOR UPDATE"#,
        order_id
    )
    .fetch_optional(lock.conn())
    .await?;
    Ok(order.map(|order| LockedOrder { lock, order }))
}

/// Applies `trigger` to a locked order and writes the outcome: the new status (and `reason`),
/// released tickets when the order gives up its hold, and a notification for long-polls.
///
/// A hold that is over is expired first, whatever the trigger: a payment that arrives after
/// `expires_at` is late even if the expiry loop has not run yet, so the outcome depends on
/// the clock, not on which process got the lock first. Tickets released are offered to the
/// waiting list with holds of `offer_ttl`.
pub async fn apply(
    locked: &mut LockedOrder<'_>,
    trigger: OrderTrigger,
    reason: Option<&str>,
    offer_ttl: Duration,
) -> sqlx::Result<Transition> {
    if locked.order.hold_over && trigger != OrderTrigger::HoldExpired {
        move_order(locked, OrderTrigger::HoldExpired, None, offer_ttl).await?;
    }
    move_order(locked, trigger, reason, offer_ttl).await
}

async fn move_order(
    locked: &mut LockedOrder<'_>,
    trigger: OrderTrigger,
    reason: Option<&str>,
    offer_ttl: Duration,
) -> sqlx::Result<Transition> {
    let order = &mut locked.order;
    let ids = [order.id];
    let transition =
        move_orders(&mut locked.lock, order.event_id, order.status, &ids, trigger, reason, Some(offer_ttl)).await?;
    if let Transition::Moves { to, .. } = transition {
        order.status = to;
        order.hold_over = false;
    }
    Ok(transition)
}

/// Applies a trigger that releases nothing (a pre-sale entry's withdrawal) to a locked order.
pub(super) async fn move_locked(locked: &mut LockedOrder<'_>, trigger: OrderTrigger) -> sqlx::Result<Transition> {
    let order = &mut locked.order;
    let transition =
        move_orders(&mut locked.lock, order.event_id, order.status, &[order.id], trigger, None, None).await?;
    if let Transition::Moves { to, .. } = transition {
        order.status = to;
    }
    Ok(transition)
}

/// Applies `trigger` to orders of one locked event that are all in status `from`, their
/// rows locked by the caller: writes the new status, settles the waiting-list entries whose
/// offers these orders were, releases the tickets when the transition says so (offering
/// them to the waiting list when `offer_ttl` is given), and notifies long-polls on commit.
async fn move_orders(
    lock: &mut EventLock<'_>,
    event_id: Uuid,
    from: OrderStatus,
    ids: &[Uuid],
    trigger: OrderTrigger,
    reason: Option<&str>,
    offer_ttl: Option<Duration>,
) -> sqlx::Result<Transition> {
    lock.check_holds(event_id)?;
    let transition = from.apply(trigger);
    if let Transition::Moves { to, releases_tickets } = transition {
        sqlx::query!(
            "UPDATE orders SET status = $2, reason = $3, updated_at = now() WHERE id = ANY($1)",
            ids,
            to.as_str(),
            reason
        )
        .execute(lock.conn())
        .await?;
        if from == OrderStatus::Pending {
            // An offer paid is a purchase; one that expired, was cancelled or declined has
            // lapsed (its tickets, released below, go on to the next entry).
            sqlx::query!(
                "UPDATE waitlist_entries SET status = CASE WHEN $2 = 'PAID' THEN 'PURCHASED' ELSE 'LAPSED' END,
                        updated_at = now()
                 WHERE order_id = ANY($1) AND status = 'OFFERED'",
                ids,
                to.as_str()
            )
            .execute(lock.conn())
            .await?;
        }
        if releases_tickets {
            tickets::release(lock, event_id, ids).await?;
            if let Some(offer_ttl) = offer_ttl {
                waitlist::offer(lock, event_id, offer_ttl).await?;
            }
        }
        crate::db::notify_order_changes(lock.conn(), ids).await?;
    }
    Ok(transition)
}

/// Expires the holds of one locked event that are over, at most `limit` of them. Returns
/// the ids of the orders it expired. Safe to run from several workers at once: each waits
/// for the event's lock and then sees only the holds still `PENDING`.
pub async fn expire_event(
    lock: &mut EventLock<'_>,
    event_id: Uuid,
    limit: i64,
    offer_ttl: Duration,
) -> sqlx::Result<Vec<Uuid>> {
    lock.check_holds(event_id)?;
    let ids: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM orders
         WHERE event_id = $1 AND status = 'PENDING' AND expires_at <= now()
         ORDER BY id LIMIT $2 FOR UPDATE",
        event_id,
        limit
    )
    .fetch_all(lock.conn())
    .await?;
    if ids.is_empty() {
        return Ok(ids);
    }
    move_orders(lock, event_id, OrderStatus::Pending, &ids, OrderTrigger::HoldExpired, None, Some(offer_ttl)).await?;
    Ok(ids)
}

/// Rejects every unpaid order of an event being deleted (`QUEUED` ones before the worker
/// gets to them, `PENDING` ones releasing their tickets), with reason `EVENT_UNAVAILABLE`,
/// and closes its waiting list. Returns how many orders were rejected.
pub async fn withdraw_event(lock: &mut EventLock<'_>, event_id: Uuid) -> sqlx::Result<usize> {
    lock.check_holds(event_id)?;
    let mut rejected = 0;
    for status in [OrderStatus::Queued, OrderStatus::Pending] {
        let ids: Vec<Uuid> = sqlx::query_scalar!(
            "SELECT id FROM orders WHERE event_id = $1 AND status = $2 ORDER BY id FOR UPDATE",
            event_id,
            status.as_str()
        )
        .fetch_all(lock.conn())
        .await?;
        if !ids.is_empty() {
            let reason = Some(reason::EVENT_UNAVAILABLE);
            move_orders(lock, event_id, status, &ids, OrderTrigger::EventWithdrawn, reason, None).await?;
            rejected += ids.len();
        }
    }
    sqlx::query!(
        "UPDATE waitlist_entries SET status = 'CLOSED', updated_at = now()
         WHERE event_id = $1 AND status IN ('WAITING', 'OFFERED')",
        event_id
    )
    .execute(lock.conn())
    .await?;
    Ok(rejected)
}

/// Who asked for a refund.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundSource {
    /// The payment provider reported it: the money is back already.
    Provider,
    /// An admin asked for it (`requested_by`); the provider executes it.
    Admin,
    /// The event was deleted with `?refund=true`; the provider executes it.
    EventDeleted,
}

impl RefundSource {
    fn reason(self) -> &'static str {
        match self {
            Self::Provider => reason::PROVIDER_REFUND,
            Self::Admin => reason::ADMIN_REFUND,
            Self::EventDeleted => reason::EVENT_DELETED,
        }
    }
}

/// Refunds a locked order: `PAID → REFUNDED`, its tickets cancelled (checked in or not) and
/// released to the waiting list or the sale, and the refund recorded once (`refunds`, keyed
/// by the order). A refund the provider reports for an order refunded already marks the
/// recorded refund executed.
pub async fn refund(
    locked: &mut LockedOrder<'_>,
    source: RefundSource,
    requested_by: Option<Uuid>,
    offer_ttl: Duration,
) -> sqlx::Result<Transition> {
    let transition = apply(locked, OrderTrigger::Refunded, Some(source.reason()), offer_ttl).await?;
    let id = locked.order.id;
    match transition {
        Transition::Moves { .. } => {
            record_refunds(locked.lock.conn(), &[id], source, requested_by).await?;
        }
        Transition::AlreadyThere if source == RefundSource::Provider => {
            sqlx::query!("UPDATE refunds SET executed_at = coalesce(executed_at, now()) WHERE order_id = $1", id)
                .execute(locked.lock.conn())
                .await?;
        }
        _ => {}
    }
    Ok(transition)
}

async fn record_refunds(
    tx: &mut PgConnection,
    ids: &[Uuid],
    source: RefundSource,
    requested_by: Option<Uuid>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO refunds (order_id, amount, currency, source, requested_by, executed_at)
         SELECT id, total, currency, $2, $3, CASE WHEN $2 = 'PROVIDER' THEN now() END
         FROM orders WHERE id = ANY($1)
         ON CONFLICT (order_id) DO NOTHING",
        ids,
        source as RefundSource,
        requested_by
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One step of deleting an event with refunds (see `events.refunding_since`): refunds up to
/// `limit` of its paid orders, or, when none is left, marks the deletion finished. Returns
/// how many orders it refunded (0: finished, or nothing to do). Safe to run from several
/// processes at once, and again after a crash: an order is refunded once.
pub async fn refund_deleted_event(
    lock: &mut EventLock<'_>,
    event_id: Uuid,
    limit: i64,
    requested_by: Option<Uuid>,
) -> sqlx::Result<usize> {
    if !lock.event(event_id).is_some_and(|event| event.refunding) {
        return Ok(0);
    }
    let ids: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM orders WHERE event_id = $1 AND status = 'PAID' ORDER BY id LIMIT $2 FOR UPDATE",
        event_id,
        limit
    )
    .fetch_all(lock.conn())
    .await?;
    if ids.is_empty() {
        sqlx::query!("UPDATE events SET refunding_since = NULL, updated_at = now() WHERE id = $1", event_id)
            .execute(lock.conn())
            .await?;
        return Ok(0);
    }
    let source = RefundSource::EventDeleted;
    move_orders(lock, event_id, OrderStatus::Paid, &ids, OrderTrigger::Refunded, Some(source.reason()), None).await?;
    record_refunds(lock.conn(), &ids, source, requested_by).await?;
    Ok(ids.len())
}
