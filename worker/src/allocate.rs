//! The partition consumers and the batch allocator.
//!
//! One task per partition queue consumes with a bounded prefetch and takes a batch
//! (messages until they name about `BATCH_SIZE` orders, or what arrived within
//! `BATCH_WAIT_MS` of the first; a message names the orders the api stored together). The
//! batch goes to the decider, which decides every batch waiting at that moment in one
//! transaction: lock their event rows ([`common::sales::lock_events`]), read their ticket
//! types and still-`QUEUED` orders (and, for events with a buyer cap, what those buyers
//! hold), decide each event's orders in arrival order, all lines or nothing, against each
//! type's stock and the venue cap (`capacity - sold`), write the outcomes with their tickets
//! and `sold` ([`common::sales::allocate`]) and how far each partition has got, commit.
//! Only then is the batch acked, so a crash at any point leads to redelivery, and
//! redelivery is harmless because an order that is no longer `QUEUED` is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use common::amqp::{PurchaseMessage, declare_topology, decode_purchase, purchase_queue};
use common::config::WorkerConfig;
use common::sales::{self, Decision, EventLock, EventStock, Request, Tickets, stock};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::membership::Assignment;
use crate::retry::Backoff;

/// What one partition consumer needs; shared by all of them.
pub struct Allocator {
    pub amqp: common::amqp::Pool,
    pub config: Arc<WorkerConfig>,
    pub worker_id: Uuid,
    pub assignment: watch::Receiver<Assignment>,
    /// The decider's queue (see [`decider`]).
    pub jobs: mpsc::Sender<Job>,
    /// Counts the subscribed partitions (readiness, `turnstile_partitions_subscribed`).
    pub probe: crate::health::Probe,
}

/// A batch's orders by event, events in order of first appearance, orders in arrival order.
type Groups = Vec<(Uuid, Vec<Uuid>)>;

/// One partition's batch, to be decided in the next transaction.
pub struct Job {
    partition: u16,
    groups: Groups,
    done: oneshot::Sender<Result<BatchOutcome, String>>,
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

/// How a consumer session ended, when it ended well.
enum Ended {
    Shutdown,
    /// Stepped back from a partition another worker prefers.
    SteppedBack,
}

impl Allocator {
    /// Consumes one partition until shutdown, re-subscribing after broker failures (with
    /// back-off) and after stepping back. `subscribed` is notified after the first
    /// subscription, so the process can say when it is ready.
    pub async fn run_partition(
        self: Arc<Self>,
        partition: u16,
        subscribed: Arc<tokio::sync::Semaphore>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        let mut first = Some(subscribed);
        let mut failed = false;
        while !shutdown.is_cancelled() {
            match self.consume(partition, &mut first, failed, &shutdown).await {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::SteppedBack) => {
                    failed = false;
                    backoff.reset();
                }
                Err(err) => {
                    failed = true;
                    tracing::warn!(partition, error = format!("{err:#}"), "partition consumer failed; reconnecting");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                }
            }
        }
    }

    async fn consume(
        &self,
        partition: u16,
        first: &mut Option<Arc<tokio::sync::Semaphore>>,
        after_failure: bool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Ended> {
        let connection = self.amqp.get().await.context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await.context("opening a channel")?;
        if after_failure {
            // The queue may have been deleted meanwhile.
            declare_topology(&channel, self.config.broker.partitions).await.context("declaring the topology")?;
        }
        let prefetch = self.config.batch_size.saturating_mul(2);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let tag = format!("worker-{}-p{partition}", self.worker_id);
        let mut consumer = channel
            .basic_consume(
                purchase_queue(partition).into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("subscribing")?;
        let _counted = self.probe.subscribed();
        if let Some(subscribed) = first.take() {
            subscribed.add_permits(1);
        }
        let ended = self.consume_batches(partition, &channel, &mut consumer, shutdown).await;
        // Closing the channel hands unacknowledged messages back to the queue, which gives
        // them to the next subscriber in line.
        let _ = channel.close(200, "consumer done".into()).await;
        ended
    }

    async fn consume_batches(
        &self,
        partition: u16,
        channel: &Channel,
        consumer: &mut Consumer,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Ended> {
        let mut rebalance = tokio::time::interval(self.config.heartbeat());
        rebalance.tick().await;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                _ = rebalance.tick() => {
                    if self.assignment.borrow().prefers(partition) {
                        continue;
                    }
                    return Ok(Ended::SteppedBack);
                }
                delivery = consumer.next() => delivery,
            };
            let mut batch = vec![next_delivery(first)?];
            // Counted in orders, roughly: a message carries a batch of the api's orders.
            let mut orders = orders_in(&batch[0]);
            let deadline = tokio::time::Instant::now() + self.config.batch_wait();
            while orders < usize::from(self.config.batch_size) {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(delivery) => {
                        let delivery = next_delivery(delivery)?;
                        orders += orders_in(&delivery);
                        batch.push(delivery);
                    }
                    Err(_) => break,
                }
            }
            if !self.process(partition, channel, batch, shutdown).await? {
                return Ok(Ended::Shutdown);
            }
        }
    }

    /// Allocates one batch and acks it. `Ok(false)`: shutdown began while the database was
    /// failing; the batch is left unacked (the channel's closing requeues it).
    ///
    /// The batch has a span of its own, linked to the trace of every order in it (exported
    /// with the spans when OTLP is on); each order's decision is logged with the order's
    /// own `trace_id`, the one the api logged when it accepted the order.
    async fn process(
        &self,
        partition: u16,
        channel: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let span = tracing::info_span!("batch", partition, messages = batch.len());
        self.process_in_span(partition, channel, batch, shutdown, &span).instrument(span.clone()).await
    }

    async fn process_in_span(
        &self,
        partition: u16,
        channel: &Channel,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
        span: &tracing::Span,
    ) -> anyhow::Result<bool> {
        let started = Instant::now();
        let received = batch.len();
        metrics::counter!("turnstile_purchase_messages_consumed_total").increment(received as u64);
        let mut messages = Vec::with_capacity(batch.len());
        let mut last_tag = None;
        for delivery in batch {
            match decode_purchase(&delivery.data) {
                Ok(orders) => {
                    messages.extend(orders);
                    last_tag = Some(delivery.delivery_tag);
                }
                Err(err) => {
                    tracing::error!(
                        partition,
                        error = %err,
                        bytes = delivery.data.len(),
                        "undecodable purchase message; sending it to the dead-letter queue"
                    );
                    metrics::counter!("turnstile_purchase_messages_dead_lettered_total").increment(1);
                    delivery.acker.reject(BasicRejectOptions { requeue: false }).await?;
                }
            }
        }
        // Each order's trace id, for its `order decided` line. (Not skipped when that line is
        // not logged: `tracing::enabled!` confuses the per-layer filters of the subscriber,
        // and the log lines that follow it lose their span.)
        let traces: HashMap<Uuid, String> = messages
            .iter()
            .filter_map(|m| Some((m.order_id, common::telemetry::trace_id_of(m.traceparent.as_deref()?)?)))
            .collect();
        if common::telemetry::exporting() {
            for context in messages.iter().filter_map(|m| common::telemetry::remote_span(m.traceparent.as_deref()?)) {
                span.add_link(context);
            }
        }
        let groups = group_by_event(&messages);
        let mut backoff = Backoff::default();
        let totals = loop {
            let (done, outcome) = oneshot::channel();
            let job = Job { partition, groups: groups.clone(), done };
            let result = match self.jobs.send(job).await {
                Ok(()) => outcome.await.unwrap_or_else(|_| Err("the decider stopped".to_owned())),
                Err(_) => Err("the decider stopped".to_owned()),
            };
            match result {
                Ok(outcome) => break outcome,
                Err(err) => {
                    tracing::warn!(partition, events = groups.len(), error = %err, "allocation failed; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(false);
                    }
                }
            }
        };
        if let Some(tag) = last_tag {
            channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
        }
        record_decisions(&totals, &traces);
        metrics::histogram!("turnstile_allocation_batch_orders").record(messages.len() as f64);
        metrics::histogram!("turnstile_allocation_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            worker_id = %self.worker_id,
            messages = received,
            accepted = totals.accepted,
            rejected = totals.rejected,
            skipped = totals.skipped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch committed"
        );
        Ok(true)
    }
}

/// The decisions of a committed batch: counted by status and reason, their latency from
/// acceptance measured, and each logged with its order's trace id.
fn record_decisions(outcome: &BatchOutcome, traces: &HashMap<Uuid, String>) {
    let now = Utc::now();
    let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    for (decision, created_at) in &outcome.decided {
        *counts.entry((decision.status().as_str(), decision.reason.unwrap_or("NONE"))).or_default() += 1;
        let latency = (now - *created_at).to_std().unwrap_or_default();
        metrics::histogram!("turnstile_order_decision_latency_seconds").record(latency.as_secs_f64());
        tracing::info!(
            order_id = %decision.order_id,
            status = decision.status().as_str(),
            reason = decision.reason,
            trace_id = traces.get(&decision.order_id).map(String::as_str),
            "order decided"
        );
    }
    for ((status, reason), count) in counts {
        metrics::counter!("turnstile_orders_decided_total", "status" => status, "reason" => reason).increment(count);
    }
    if outcome.skipped > 0 {
        metrics::counter!("turnstile_orders_skipped_total").increment(outcome.skipped as u64);
    }
}

/// About how many orders a message names (its JSON objects with an `order_id`), without
/// decoding it: enough to size a batch.
fn orders_in(delivery: &Delivery) -> usize {
    delivery.data.windows(10).filter(|w| *w == b"\"order_id\"").count().max(1)
}

fn next_delivery(delivery: Option<lapin::Result<Delivery>>) -> anyhow::Result<Delivery> {
    match delivery {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(err)) => Err(err).context("receiving from the partition queue"),
        None => anyhow::bail!("the broker cancelled the subscription"),
    }
}

/// The batch's orders by event, events in order of first appearance, orders in arrival
/// order, each order once (a redelivered duplicate inside one batch is dropped here).
fn group_by_event(messages: &[PurchaseMessage]) -> Groups {
    let mut groups: Groups = Vec::new();
    let mut seen = HashSet::new();
    for message in messages {
        if !seen.insert(message.order_id) {
            continue;
        }
        match groups.iter_mut().find(|(event, _)| *event == message.event_id) {
            Some((_, orders)) => orders.push(message.order_id),
            None => groups.push((message.event_id, vec![message.order_id])),
        }
    }
    groups
}

/// What one batch transaction decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    accepted: usize,
    rejected: usize,
    /// Messages whose order was not `QUEUED` any more (redeliveries) or does not exist.
    skipped: usize,
    /// What was decided, in order, with when each order was accepted.
    decided: Vec<(Decision, DateTime<Utc>)>,
}

/// An order's lines as the allocator reads them from `orders.lines`.
#[derive(Debug, serde::Deserialize)]
struct LineRef {
    ticket_type_id: Uuid,
    quantity: i32,
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
    let (mut events, queued) = load(&mut lock, batches).await?;
    let plan = plan(batches, &mut events, &queued);
    if !plan.decided.is_empty() {
        sales::allocate(&mut lock, &plan.decided, &plan.tickets, hold_ttl).await?;
        record_progress(lock.conn(), &plan.progress).await?;
    }
    tx.commit().await?;
    Ok(plan.outcomes)
}

/// The `QUEUED` orders the batches name, by id, with the event each was placed for.
type Queued = HashMap<Uuid, (Uuid, Request)>;

/// Reads what the locked events have left, the orders still `QUEUED`, and what their buyers
/// already hold where a cap applies.
async fn load(
    lock: &mut EventLock<'_>,
    batches: &[(u16, &Groups)],
) -> sqlx::Result<(HashMap<Uuid, EventStock>, Queued)> {
    let mut events = stock::load(lock).await?;
    let order_ids: Vec<Uuid> =
        batches.iter().flat_map(|(_, groups)| groups.iter().flat_map(|(_, orders)| orders.iter().copied())).collect();
    let rows = sqlx::query!(
        r#"SELECT id, event_id, user_id, total = 0 AS "free!", created_at,
                  lines AS "lines: sqlx::types::Json<Vec<LineRef>>"
           FROM orders WHERE id = ANY($1) AND status = 'QUEUED'"#,
        &order_ids
    )
    .fetch_all(lock.conn())
    .await?;
    let queued: Queued = rows
        .into_iter()
        .map(|row| {
            let lines = row.lines.0.into_iter().map(|l| (l.ticket_type_id, i64::from(l.quantity))).collect();
            let request =
                Request { order_id: row.id, user_id: row.user_id, created_at: row.created_at, free: row.free, lines };
            (row.id, (row.event_id, request))
        })
        .collect();
    stock::read_holdings(lock, &mut events, queued.values().map(|(event_id, r)| (*event_id, r.user_id))).await?;
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
                let seen = plan.progress.entry(*partition).or_insert(request.created_at);
                *seen = (*seen).max(request.created_at);
                outcome.decided.push((decision.clone(), request.created_at));
                if decision.allocated() {
                    outcome.accepted += 1;
                    for &(type_id, quantity) in &request.lines {
                        plan.tickets.push(*order_id, *event_id, type_id, quantity);
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

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn groups_by_event_and_drops_duplicates() {
        let (e1, e2) = (Uuid::from_u128(100), Uuid::from_u128(200));
        let o = ids(4);
        let message = |order_id, event_id| PurchaseMessage { order_id, event_id, traceparent: None };
        let groups = group_by_event(&[
            message(o[0], e1),
            message(o[1], e2),
            message(o[0], e1),
            message(o[2], e1),
            message(o[3], e2),
        ]);
        assert_eq!(groups, [(e1, vec![o[0], o[2]]), (e2, vec![o[1], o[3]])]);
    }
}
