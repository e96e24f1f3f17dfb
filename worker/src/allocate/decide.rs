//! The decider: the partitions' batches waiting at one moment decided in one transaction,
//! under their events' locks (`common::sales`). Its queue is fed by the partition
//! consumers (the parent module), each of which acks a batch once its transaction committed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::sales::{self, Decision, EventLock, EventStock, PromoUse, Request, Tickets, stock};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::Groups;

/// One partition's batch, to be decided in the next transaction.
pub struct Job {
    pub(super) partition: u16,
    pub(super) groups: Groups,
    pub(super) done: oneshot::Sender<Result<BatchOutcome, String>>,
}

/// The most partition batches decided in one transaction.
const JOBS_PER_TRANSACTION: usize = 64;

/// The task that decides the partitions' batches: whatever batches are waiting
/// when a transaction starts share it, one at a time. On a hot event one partition fills
/// every batch; on a normal day (orders spread over many events, so over every partition)
/// each partition's batch is small, and deciding the partitions' batches together keeps
/// the statements and the commit per order as few as when one event is hot. A partition's
/// batch is acked only once its transaction committed; each partition's batches are still
/// decided in their order (a consumer waits for one before sending the next).
///
/// Returns the queue to send batches to, and the task, which ends once every sender is gone.
pub fn decider(db: PgPool, hold_ttl: Duration) -> (mpsc::Sender<Job>, impl Future<Output = ()> + Send + 'static) {
    let (jobs, mut queue) = mpsc::channel::<Job>(JOBS_PER_TRANSACTION * 4);
    let task = async move {
        let mut waiting = Vec::with_capacity(JOBS_PER_TRANSACTION);
        while queue.recv_many(&mut waiting, JOBS_PER_TRANSACTION).await > 0 {
            let batches: Vec<(u16, &Groups)> = waiting.iter().map(|job| (job.partition, &job.groups)).collect();
            let started = Instant::now();
            let result = allocate_batches(&db, &batches, hold_ttl).await;
            metrics::histogram!("turnstile_allocation_transaction_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(outcomes) => {
                    for (job, outcome) in waiting.drain(..).zip(outcomes) {
                        let _ = job.done.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    let message = err.to_string();
                    for job in waiting.drain(..) {
                        let _ = job.done.send(Err(message.clone()));
                    }
                }
            }
        }
    };
    (jobs, task)
}

/// What one batch transaction decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub(super) accepted: usize,
    pub(super) rejected: usize,
    /// Messages whose order was not `QUEUED` any more (redeliveries) or does not exist.
    pub(super) skipped: usize,
    /// What was decided, in order, with when each order was accepted.
    pub(super) decided: Vec<(Decision, DateTime<Utc>)>,
    /// Promo code uses asked for by the decided orders, by outcome: `taken` (issued),
    /// `used_up`, `buyer_limit`, or `refused` (the order was refused for another reason).
    pub(super) promo_uses: HashMap<&'static str, u64>,
}

/// An order's lines as the allocator reads them from `orders.lines`.
#[derive(Debug, serde::Deserialize)]
struct LineRef {
    ticket_type_id: Uuid,
    quantity: i32,
    /// Present on the lines the order's promo code applies to.
    #[serde(default)]
    list_price: Option<serde_json::Value>,
}

/// Partitions' batches in one transaction, whatever the number of events in them, under
/// their events' locks ([`sales::lock_events`]). The orders and the events' ticket types
/// are read without locking them: every writer of an order's status or of a type's `sold`
/// holds its event's lock, so while the transaction holds it no one else can change them.
/// Returns each batch's outcome, in the order given.
async fn allocate_batches(
    db: &PgPool,
    batches: &[(u16, &Groups)],
    hold_ttl: Duration,
) -> sqlx::Result<Vec<BatchOutcome>> {
    let mut tx = db.begin().await?;
    let event_ids: Vec<Uuid> = batches.iter().flat_map(|(_, groups)| groups.iter().map(|(event, _)| *event)).collect();
    let mut lock = sales::lock_events(&mut tx, &event_ids).await?;
    let presale: Vec<Uuid> = lock.events().iter().filter(|e| e.presale).map(|e| e.id).collect();
    let drawn = if presale.is_empty() { Vec::new() } else { sales::draw::drawn_entries(&mut lock, &presale).await? };
    let with_drawn = (!drawn.is_empty()).then(|| drawn_first(batches, &drawn));
    let with_drawn: Vec<(u16, &Groups)> =
        with_drawn.iter().flatten().map(|(partition, groups)| (*partition, groups)).collect();
    let batches = if with_drawn.is_empty() { batches } else { &with_drawn };
    let (mut events, queued) = load(&mut lock, batches).await?;
    let plan = plan(batches, &mut events, &queued);
    if !plan.decided.is_empty() {
        sales::allocate(&mut lock, &plan.decided, &plan.tickets, hold_ttl).await?;
        record_progress(lock.conn(), &plan.progress).await?;
    }
    tx.commit().await?;
    Ok(plan.outcomes)
}

/// The batches with their events' drawn pre-sale entries (still `QUEUED`, in number order)
/// put first: ahead of the first batch's orders of that event, and out of every later place
/// they are named (their own messages, sent by the draw, may come later or earlier).
fn drawn_first(batches: &[(u16, &Groups)], drawn: &[(Uuid, Uuid)]) -> Vec<(u16, Groups)> {
    let mut ahead: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (event_id, order_id) in drawn {
        ahead.entry(*event_id).or_default().push(*order_id);
    }
    let entries: std::collections::HashSet<Uuid> = drawn.iter().map(|(_, order_id)| *order_id).collect();
    batches
        .iter()
        .map(|(partition, groups)| {
            let groups = groups
                .iter()
                .map(|(event_id, orders)| {
                    let rest = orders.iter().filter(|id| !entries.contains(id)).copied();
                    let orders: Vec<Uuid> =
                        ahead.remove(event_id).unwrap_or_default().into_iter().chain(rest).collect();
                    (*event_id, orders)
                })
                .collect();
            (*partition, groups)
        })
        .collect()
}

/// The `QUEUED` orders the batches name, by id, with the event each was placed for.
type Queued = HashMap<Uuid, (Uuid, Request)>;

/// Reads what the locked events have left, the orders still `QUEUED`, and what their buyers
/// already hold where a cap applies, and the promo codes the orders carry.
async fn load(
    lock: &mut EventLock<'_>,
    batches: &[(u16, &Groups)],
) -> sqlx::Result<(HashMap<Uuid, EventStock>, Queued)> {
    let mut events = stock::load(lock).await?;
    let order_ids: Vec<Uuid> =
        batches.iter().flat_map(|(_, groups)| groups.iter().flat_map(|(_, orders)| orders.iter().copied())).collect();
    // By id alone, the status checked here: with `status = 'QUEUED'` in the statement, a plan
    // may AND the primary key's bitmap with `orders_queued_by_partition`'s, which reads every
    // entry of that index, live or dead: the whole backlog, on each batch.
    let rows = sqlx::query!(
        r#"SELECT id, event_id, user_id, total = 0 AS "free!", created_at, promo_code_id,
                  lines AS "lines: sqlx::types::Json<Vec<LineRef>>", status = 'QUEUED' AS "queued!"
           FROM orders WHERE id = ANY($1)"#,
        &order_ids
    )
    .fetch_all(lock.conn())
    .await?;
    let queued: Queued = rows
        .into_iter()
        .filter(|row| row.queued)
        .map(|row| {
            let promo_code = row.promo_code_id.map(|code| PromoUse {
                code,
                types: row.lines.iter().filter(|l| l.list_price.is_some()).map(|l| l.ticket_type_id).collect(),
            });
            let lines = row.lines.0.into_iter().map(|l| (l.ticket_type_id, i64::from(l.quantity))).collect();
            let request = Request {
                order_id: row.id,
                user_id: row.user_id,
                created_at: row.created_at,
                free: row.free,
                lines,
                promo_code,
            };
            (row.id, (row.event_id, request))
        })
        .collect();
    stock::read_holdings(lock, &mut events, queued.values().map(|(event_id, r)| (*event_id, r.user_id))).await?;
    let uses = queued.values().filter_map(|(_, r)| r.promo_code.as_ref().map(|used| (r.user_id, used.code)));
    stock::read_codes(lock, &mut events, uses).await?;
    Ok((events, queued))
}

/// What a transaction writes: every decision, the tickets issued, and how far each
/// partition got.
#[derive(Debug, Default)]
struct Plan {
    outcomes: Vec<BatchOutcome>,
    decided: Vec<Decision>,
    tickets: Tickets,
    progress: HashMap<u16, DateTime<Utc>>,
}

/// Decides the batches' orders, in order, against what the events have left (pure: the
/// database is read before and written after). An order is decided only under the event
/// its message names; one that is not `QUEUED` any more, or whose event does not exist, is
/// skipped.
fn plan(batches: &[(u16, &Groups)], events: &mut HashMap<Uuid, EventStock>, queued: &Queued) -> Plan {
    let mut plan = Plan::default();
    for (partition, groups) in batches {
        let mut outcome = BatchOutcome::default();
        for (event_id, orders) in groups.iter() {
            let Some(stock) = events.get_mut(event_id) else {
                tracing::warn!(%event_id, orders = orders.len(), "purchase messages for an unknown event; skipping");
                outcome.skipped += orders.len();
                continue;
            };
            for order_id in orders {
                let Some((_, request)) = queued.get(order_id).filter(|(event, _)| event == event_id) else {
                    outcome.skipped += 1;
                    continue;
                };
                let decision = stock.decide(request);
                if let Some((_, uses)) = request.code_uses() {
                    let kind = match decision.reason {
                        _ if decision.allocated() => "taken",
                        Some(common::domain::reason::PROMO_CODE_USED_UP) => "used_up",
                        Some(common::domain::reason::PROMO_CODE_BUYER_LIMIT) => "buyer_limit",
                        _ => "refused",
                    };
                    *outcome.promo_uses.entry(kind).or_default() += u64::try_from(uses).unwrap_or(0);
                }
                let seen = plan.progress.entry(*partition).or_insert(request.created_at);
                *seen = (*seen).max(request.created_at);
                outcome.decided.push((decision.clone(), request.created_at));
                if decision.allocated() {
                    outcome.accepted += 1;
                    for &(type_id, quantity) in &request.lines {
                        plan.tickets.push(*order_id, *event_id, type_id, quantity, request.code_for(type_id));
                    }
                } else {
                    outcome.rejected += 1;
                }
                plan.decided.push(decision);
            }
        }
        plan.outcomes.push(outcome);
    }
    plan
}

/// How far each partition's consumer has got (see `republish`): it decided orders created
/// up to this time, so messages of orders created well before have been taken from its
/// queue. One statement for every partition of the transaction.
async fn record_progress(tx: &mut sqlx::PgConnection, progress: &HashMap<u16, DateTime<Utc>>) -> sqlx::Result<()> {
    if progress.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i16> = progress.keys().map(|p| i16::try_from(*p).unwrap_or(i16::MAX)).collect();
    let times: Vec<DateTime<Utc>> = progress.values().copied().collect();
    sqlx::query!(
        "INSERT INTO partition_progress AS p (partition, seen_through)
         SELECT * FROM UNNEST($1::int2[], $2::timestamptz[]) ORDER BY 1
         ON CONFLICT (partition) DO UPDATE
         SET seen_through = greatest(p.seen_through, excluded.seen_through), updated_at = now()",
        &partitions,
        &times
    )
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::domain::OrderStatus;

    /// Drawn entries (4, 5 of event 1) go ahead of the first batch's orders of their event,
    /// and out of the later places their own messages put them; other events are untouched.
    #[test]
    fn drawn_entries_come_first_and_once() {
        let o = |n: u128| Uuid::from_u128(100 + n);
        let (event, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first: Groups = vec![(other, vec![o(9)]), (event, vec![o(1), o(5), o(2)])];
        let second: Groups = vec![(event, vec![o(4), o(3)])];
        let batches = drawn_first(&[(0, &first), (0, &second)], &[(event, o(4)), (event, o(5))]);
        assert_eq!(
            batches,
            [(0, vec![(other, vec![o(9)]), (event, vec![o(4), o(5), o(1), o(2)])]), (0, vec![(event, vec![o(3)])])]
        );
    }

    #[test]
    fn a_plan_decides_in_order_counts_the_tickets_and_skips_what_is_not_queued() {
        let (event, other_event, missing_event, ga) =
            (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(10));
        let stock = |venue_left| EventStock {
            open: true,
            venue_left,
            types: HashMap::from([(ga, stock::TypeStock::default())]),
            ..Default::default()
        };
        let mut events = HashMap::from([(event, stock(3)), (other_event, stock(10))]);
        let at = |s: i64| DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).expect("a time");
        let request = |n: u128, quantity: i64| Request {
            order_id: Uuid::from_u128(100 + n),
            user_id: Uuid::from_u128(200 + n),
            created_at: at(i64::try_from(n).expect("small")),
            free: false,
            lines: vec![(ga, quantity)],
            promo_code: None,
        };
        // Orders 1-5 for `event` (1, 2, 1, 1, 1 tickets: 3 fit); order 6 is queued for
        // `other_event` but its message names `event`; order 7 is not queued any more.
        let mut queued: Queued =
            (1..=5).map(|n| (Uuid::from_u128(100 + n), (event, request(n, [1, 2, 1, 1, 1][n as usize - 1])))).collect();
        queued.insert(Uuid::from_u128(106), (other_event, request(6, 1)));
        let first: Groups = vec![(event, (1..=3).map(|n| Uuid::from_u128(100 + n)).collect())];
        let second: Groups = vec![
            (event, [4, 5, 6, 7].map(|n| Uuid::from_u128(100 + n)).to_vec()),
            (missing_event, vec![Uuid::from_u128(108)]),
        ];

        let plan = plan(&[(0, &first), (3, &second)], &mut events, &queued);

        let summary: Vec<(usize, usize, usize)> =
            plan.outcomes.iter().map(|o| (o.accepted, o.rejected, o.skipped)).collect();
        assert_eq!(summary, [(2, 1, 0), (0, 2, 3)], "order 3 and later are refused: 1 + 2 tickets leave none");
        let statuses: Vec<(u128, OrderStatus)> =
            plan.decided.iter().map(|d| (d.order_id.as_u128() - 100, d.status())).collect();
        assert_eq!(
            statuses,
            [
                (1, OrderStatus::Pending),
                (2, OrderStatus::Pending),
                (3, OrderStatus::Rejected),
                (4, OrderStatus::Rejected),
                (5, OrderStatus::Rejected)
            ]
        );
        assert_eq!(plan.tickets.ids.len(), 3);
        assert_eq!(plan.tickets.events, [event; 3]);
        assert_eq!(plan.tickets.types, [ga; 3]);
        assert_eq!(plan.tickets.orders, [101, 102, 102].map(Uuid::from_u128));
        assert_eq!(plan.tickets.per_event(), HashMap::from([(event, 3)]));
        assert_eq!(plan.tickets.per_type(), HashMap::from([(ga, 3)]));
        assert_eq!(events[&event].venue_left, 0);
        assert_eq!(plan.progress, HashMap::from([(0, at(3)), (3, at(5))]));
    }
}
