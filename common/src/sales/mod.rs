//! Every change to what is sold: orders' statuses, tickets and `sold`. Two rules hold here
//! by construction, and nowhere else needs to know them:
//!
//! - **The event lock first.** Every function that changes an event's stock or its orders'
//!   statuses takes an [`EventLock`], which only [`lock_event`], [`lock_live_event`] and
//!   [`lock_events`] make (several events are locked in id order), and which borrows the
//!   transaction. Order rows are locked after it, so such transactions queue behind each
//!   other and never deadlock; the allocator reads an event's orders and types without
//!   locking them, since no one else can change them while it holds the event.
//! - **Every status comes from [`OrderStatus::apply`].** The allocator's decisions
//!   ([`allocate`]), the waiting list's offers ([`waitlist::offer`]) and every later change
//!   ([`changes`]) compute the status they write through the state machine; tickets are
//!   issued by [`tickets::issue`] and given back by [`tickets::release`] only.
//!
//! The rules of a decision are pure ([`stock::EventStock::decide`]); what they read is
//! loaded under the lock ([`stock::load`], [`stock::read_holdings`]).
//!
//! [`OrderStatus::apply`]: crate::domain::OrderStatus::apply

pub mod changes;
pub mod draw;
mod lock;
pub mod stock;
pub mod tickets;
pub mod waitlist;

use std::time::Duration;

use uuid::Uuid;

pub use lock::{EventLock, LockedEvent, lock_event, lock_events, lock_live_event};
pub use stock::{Decision, EventStock, PromoUse, Request};
pub use tickets::Tickets;

/// Writes the rules' decisions for `QUEUED` orders of the locked events: each order moves
/// where [`OrderStatus::apply`](crate::domain::OrderStatus::apply) takes it from `QUEUED`
/// (with a hold of `hold_ttl` when `PENDING`), the tickets of those that got them are
/// issued, their events' serving counters move (see `migrations/0019_queue_positions.sql`),
/// and long-polls are told on commit. The decisions are of orders read `QUEUED`
/// under this lock, of its events (so no one else can have moved them since).
pub async fn allocate(
    lock: &mut EventLock<'_>,
    decisions: &[Decision],
    tickets: &Tickets,
    hold_ttl: Duration,
) -> sqlx::Result<()> {
    let mut ids = Vec::with_capacity(decisions.len());
    let mut statuses = Vec::with_capacity(decisions.len());
    let (mut reasons, mut reason_types) = (Vec::with_capacity(decisions.len()), Vec::with_capacity(decisions.len()));
    for decision in decisions {
        let Some(to) = decision.moves_to() else {
            tracing::error!(order_id = %decision.order_id, trigger = ?decision.trigger, "a decision that moves no queued order");
            continue;
        };
        ids.push(decision.order_id);
        statuses.push(to.as_str());
        reasons.push(decision.reason);
        reason_types.push(decision.reason_type);
    }
    // Each order carries its decision as a status change (its id, transaction, time,
    // status and reason; migration 0026), which the history trigger leaves out.
    // The events' `sold` rises here, with their serving counters (the highest queue number
    // decided), the tickets their decided orders asked for (what the queue asks for is what
    // was numbered less what was decided), and their decision rates (smoothed; unknown again
    // after 30 s without a decision): one update of each event row per batch.
    let (events, sold): (Vec<Uuid>, Vec<i64>) = tickets.per_event().into_iter().unzip();
    sqlx::query!(
        "WITH moved AS (
             UPDATE orders o
             SET status = d.status, reason = d.reason, reason_ticket_type_id = d.reason_type, updated_at = now(),
                 expires_at = CASE WHEN d.status = 'PENDING' THEN now() + make_interval(secs => $5) END,
                 decided_xid = pg_current_xact_id(), decided_event_id = nextval('order_history_id_seq'),
                 decided_at = now(), decided_status = d.status, decided_reason = d.reason
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[]) AS d(id, status, reason, reason_type)
             WHERE o.id = d.id
             RETURNING o.event_id, o.queue_number, o.quantity
         ),
         served AS (
             SELECT event_id, max(queue_number) AS last, count(*) AS decided,
                    coalesce(sum(quantity) FILTER (WHERE queue_number IS NOT NULL), 0) AS tickets
             FROM moved GROUP BY event_id
         )
         UPDATE events e
         SET sold = e.sold + coalesce(t.issued, 0),
             queue_decided = greatest(e.queue_decided, coalesce(s.last, 0)),
             queue_tickets_decided = e.queue_tickets_decided + s.tickets,
             queue_rate = CASE WHEN e.queue_decided_at > now() - interval '30 seconds' THEN
                 coalesce(0.7 * e.queue_rate, 0.0) + CASE WHEN e.queue_rate IS NULL THEN 1.0 ELSE 0.3 END
                     * s.decided / greatest(extract(epoch FROM now() - e.queue_decided_at)::float8, 0.001)
             END,
             queue_decided_at = now()
         FROM served s LEFT JOIN UNNEST($6::uuid[], $7::int8[]) AS t(id, issued) ON t.id = s.event_id
         WHERE e.id = s.event_id",
        &ids,
        &statuses as &[&str],
        &reasons as &[Option<&str>],
        &reason_types as &[Option<Uuid>],
        hold_ttl.as_secs_f64(),
        &events,
        &sold
    )
    .execute(lock.conn())
    .await?;
    tickets::issue_for_orders(lock, tickets).await?;
    crate::db::notify_order_changes(lock.conn(), &ids).await
}
