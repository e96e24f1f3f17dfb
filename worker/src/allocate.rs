//! The partition consumers and the batch allocator: the only code that issues tickets.
//!
//! One task per partition queue consumes with a bounded prefetch and takes a batch
//! (messages until they name about `BATCH_SIZE` orders, or what arrived within
//! `BATCH_WAIT_MS` of the first; a message names the orders the api stored together). The
//! batch goes to the decider, which decides every batch waiting at that moment in one
//! transaction: lock their event rows, read their ticket types and still-`QUEUED` orders
//! (and, for events with a buyer cap, what those buyers hold), decide each event's orders in
//! arrival order, all lines or nothing, against each type's stock and the venue cap
//! (`capacity - sold`), write the outcomes, insert the tickets, bump the events' and types'
//! `sold` and record how far each partition has got with one statement each, commit. Only then is the batch acked, so a crash at any point leads to redelivery,
//! and redelivery is harmless because an order that is no longer `QUEUED` is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use common::amqp::{PurchaseMessage, declare_topology, decode_purchase, purchase_queue};
use common::config::WorkerConfig;
use common::domain::{OrderEvent, OrderStatus, reason};
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
    pub amqp: deadpool_lapin::Pool,
    pub config: Arc<WorkerConfig>,
    pub worker_id: Uuid,
    pub assignment: watch::Receiver<Assignment>,
    /// The decider's queue (see [`spawn_decider`]).
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
    done: oneshot::Sender<Result<Outcome, String>>,
}

/// The most partition batches decided in one transaction.
const JOBS_PER_TRANSACTION: usize = 64;

/// Starts the task that decides the partitions' batches: whatever batches are waiting
/// when a transaction starts share it, one at a time. On a hot event one partition fills
/// every batch; on a normal day (orders spread over many events, so over every partition)
/// each partition's batch is small, and deciding the partitions' batches together keeps
/// the statements and the commit per order as few as when one event is hot. A partition's
/// batch is acked only once its transaction committed; each partition's batches are still
/// decided in their order (a consumer waits for one before sending the next).
pub fn spawn_decider(db: PgPool, hold_ttl: Duration) -> mpsc::Sender<Job> {
    let (jobs, mut queue) = mpsc::channel::<Job>(JOBS_PER_TRANSACTION * 4);
    tokio::spawn(async move {
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
    });
    jobs
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
fn record_decisions(outcome: &Outcome, traces: &HashMap<Uuid, String>) {
    let now = Utc::now();
    let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    for (decision, created_at) in &outcome.decided {
        *counts.entry((decision.status.as_str(), decision.reason.unwrap_or("NONE"))).or_default() += 1;
        let latency = (now - *created_at).to_std().unwrap_or_default();
        metrics::histogram!("turnstile_order_decision_latency_seconds").record(latency.as_secs_f64());
        tracing::info!(
            order_id = %decision.order_id,
            status = decision.status.as_str(),
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

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    accepted: usize,
    rejected: usize,
    /// Messages whose order was not `QUEUED` any more (redeliveries) or does not exist.
    skipped: usize,
    /// What was decided, in order, with when each order was accepted.
    decided: Vec<(Decision, DateTime<Utc>)>,
}

/// What the allocator decided for one order: the status an [`OrderEvent`] leads to from
/// `QUEUED`, the only status it reads (a test checks this against the state machine), and
/// the type a refusal is about.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Decision {
    order_id: Uuid,
    status: OrderStatus,
    reason: Option<&'static str>,
    reason_type: Option<Uuid>,
}

/// One `QUEUED` order as the allocator sees it.
#[derive(Clone, Debug)]
struct Request {
    order_id: Uuid,
    user_id: Uuid,
    /// When the api accepted it: sale windows are judged by this time, not by when the
    /// order is decided (a buyer in the queue before `sales_end` was in time).
    created_at: DateTime<Utc>,
    /// Costs nothing: paid as it is allocated.
    free: bool,
    /// (ticket type, quantity) per line.
    lines: Vec<(Uuid, i64)>,
}

impl Request {
    fn tickets(&self) -> i64 {
        self.lines.iter().map(|(_, quantity)| quantity).sum()
    }
}

/// A ticket type under its event's lock.
#[derive(Clone, Debug, Default)]
struct TypeStock {
    /// Tickets of this type left, when it has stock of its own (else only the venue cap).
    left: Option<i64>,
    withdrawn: bool,
    sales_start: Option<DateTime<Utc>>,
    sales_end: Option<DateTime<Utc>>,
    max_per_buyer: Option<i64>,
}

impl TypeStock {
    fn on_sale_at(&self, at: DateTime<Utc>) -> bool {
        !self.withdrawn && self.sales_start.is_none_or(|start| at >= start) && self.sales_end.is_none_or(|end| at < end)
    }
}

/// An event under its lock: what is left of it, and what each buyer holds, as the orders
/// of the transaction take their tickets in turn.
#[derive(Clone, Debug, Default)]
struct EventStock {
    /// Not deleted and not started.
    open: bool,
    /// `capacity - sold`: the venue cap over all types.
    venue_left: i64,
    max_per_buyer: Option<i64>,
    types: HashMap<Uuid, TypeStock>,
    /// Tickets each buyer holds of the event (`(user, None)`) and of each type
    /// (`(user, Some(type))`), in `PENDING` and `PAID` orders; read only when a cap exists.
    held: HashMap<(Uuid, Option<Uuid>), i64>,
}

impl EventStock {
    /// Whether any buyer cap applies (only then are holdings read).
    fn caps_buyers(&self) -> bool {
        self.max_per_buyer.is_some() || self.types.values().any(|t| t.max_per_buyer.is_some())
    }

    /// Decides one order, in arrival order: all of it or nothing. Refused orders take
    /// nothing, so a later (smaller) order may still fit. An order that costs nothing is
    /// paid as it is allocated. Pure, so the rules are unit-tested.
    fn decide(&mut self, order: &Request) -> Decision {
        let (event, reason, reason_type) = match self.refusal(order) {
            Some((reason, reason_type)) => (OrderEvent::AllocationRejected, Some(reason), reason_type),
            None => {
                self.take(order);
                if order.free {
                    (OrderEvent::AllocatedFree, Some(reason::FREE_ORDER), None)
                } else {
                    (OrderEvent::Allocated, None, None)
                }
            }
        };
        Decision { order_id: order.order_id, status: event.target(), reason, reason_type }
    }

    /// Why the order cannot have its tickets, if it cannot: the event is closed; a line's
    /// type is not on sale at the order's arrival; the buyer would pass a cap; a type is out
    /// of stock; the venue is full. In that order.
    fn refusal(&self, order: &Request) -> Option<(&'static str, Option<Uuid>)> {
        if !self.open {
            return Some((reason::EVENT_UNAVAILABLE, None));
        }
        for (type_id, _) in &order.lines {
            if !self.types.get(type_id).is_some_and(|t| t.on_sale_at(order.created_at)) {
                return Some((reason::NOT_ON_SALE, Some(*type_id)));
            }
        }
        let total = order.tickets();
        let held = |key: Option<Uuid>| self.held.get(&(order.user_id, key)).copied().unwrap_or(0);
        if self.max_per_buyer.is_some_and(|cap| held(None) + total > cap) {
            return Some((reason::BUYER_LIMIT, None));
        }
        for (type_id, quantity) in &order.lines {
            if self.types[type_id].max_per_buyer.is_some_and(|cap| held(Some(*type_id)) + quantity > cap) {
                return Some((reason::BUYER_LIMIT, Some(*type_id)));
            }
        }
        for (type_id, quantity) in &order.lines {
            if self.types[type_id].left.is_some_and(|left| *quantity > left) {
                return Some((reason::SOLD_OUT, Some(*type_id)));
            }
        }
        if total > self.venue_left {
            // A type without stock of its own is sold out when the venue is.
            return Some(match order.lines.iter().find(|(type_id, _)| self.types[type_id].left.is_none()) {
                Some((type_id, _)) => (reason::SOLD_OUT, Some(*type_id)),
                None => (reason::VENUE_FULL, None),
            });
        }
        None
    }

    fn take(&mut self, order: &Request) {
        let total = order.tickets();
        self.venue_left -= total;
        let track = self.caps_buyers();
        if track {
            *self.held.entry((order.user_id, None)).or_default() += total;
        }
        for (type_id, quantity) in &order.lines {
            if let Some(stock) = self.types.get_mut(type_id)
                && let Some(left) = stock.left.as_mut()
            {
                *left -= quantity;
            }
            if track {
                *self.held.entry((order.user_id, Some(*type_id))).or_default() += quantity;
            }
        }
    }
}

/// An order's lines as the allocator reads them from `orders.lines`.
#[derive(serde::Deserialize)]
struct LineRef {
    ticket_type_id: Uuid,
    quantity: i32,
}

/// Partitions' batches in one transaction, whatever the number of events in them. Locks
/// the batches' event rows, in id order (`FOR NO KEY UPDATE`: writers exclude each other,
/// readers and inserts are not blocked). The orders and the events' ticket types are then
/// read without locking them: every writer of an order's status or of a type's `sold` (this
/// allocator, payments, cancellations, expiry, an event's deletion, an admin's edit of a
/// type) takes its event's row lock first, so while the transaction holds its events' locks
/// no one else can change them. That ordering also means this cannot deadlock with them.
/// Returns each batch's outcome, in the order given.
async fn allocate_batches(db: &PgPool, batches: &[(u16, &Groups)], hold_ttl: Duration) -> sqlx::Result<Vec<Outcome>> {
    let mut tx = db.begin().await?;
    let mut event_ids: Vec<Uuid> =
        batches.iter().flat_map(|(_, groups)| groups.iter().map(|(event, _)| *event)).collect();
    event_ids.sort();
    event_ids.dedup();
    let mut events: HashMap<Uuid, EventStock> = sqlx::query_as::<_, (Uuid, i32, i32, bool, Option<i32>)>(
        "SELECT id, capacity, sold, deleted_at IS NULL AND starts_at > now(), max_per_buyer FROM events
         WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&event_ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(id, capacity, sold, open, max_per_buyer)| {
        let venue_left = i64::from(capacity - sold).max(0);
        let stock = EventStock { open, venue_left, max_per_buyer: max_per_buyer.map(i64::from), ..Default::default() };
        (id, stock)
    })
    .collect();
    // Their ticket types, in one statement for all the events (rows in binary: cheaper, on a
    // day of many events, than a JSON aggregate per event row).
    type TypeRow = (Uuid, Uuid, Option<i32>, bool, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<i32>);
    let types: Vec<TypeRow> = sqlx::query_as(
        "SELECT id, event_id, capacity - sold, deleted_at IS NOT NULL, sales_start, sales_end, max_per_buyer
         FROM ticket_types WHERE event_id = ANY($1)",
    )
    .bind(&event_ids)
    .fetch_all(&mut *tx)
    .await?;
    for (id, event_id, left, withdrawn, sales_start, sales_end, max_per_buyer) in types {
        if let Some(event) = events.get_mut(&event_id) {
            let left = left.map(|left| i64::from(left).max(0));
            let max_per_buyer = max_per_buyer.map(i64::from);
            event.types.insert(id, TypeStock { left, withdrawn, sales_start, sales_end, max_per_buyer });
        }
    }
    let order_ids: Vec<Uuid> =
        batches.iter().flat_map(|(_, groups)| groups.iter().flat_map(|(_, orders)| orders.iter().copied())).collect();
    type OrderRow = (Uuid, Uuid, Uuid, bool, DateTime<Utc>, sqlx::types::Json<Vec<LineRef>>);
    let rows: Vec<OrderRow> = sqlx::query_as(
        "SELECT id, event_id, user_id, total = 0, created_at, lines FROM orders WHERE id = ANY($1) AND status = 'QUEUED'",
    )
    .bind(&order_ids)
    .fetch_all(&mut *tx)
    .await?;
    // An order is allocated only under the event its message names.
    let queued: HashMap<Uuid, (Uuid, Request)> = rows
        .into_iter()
        .map(|(order_id, event_id, user_id, free, created_at, lines)| {
            let lines = lines.0.into_iter().map(|l| (l.ticket_type_id, i64::from(l.quantity))).collect();
            (order_id, (event_id, Request { order_id, user_id, created_at, free, lines }))
        })
        .collect();
    read_holdings(&mut tx, &mut events, queued.values()).await?;

    let mut outcomes = Vec::with_capacity(batches.len());
    let mut decided: Vec<Decision> = Vec::with_capacity(order_ids.len());
    let (mut ticket_ids, mut ticket_orders, mut ticket_events, mut ticket_types) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut issued_per_event: HashMap<Uuid, i64> = HashMap::new();
    let mut issued_per_type: HashMap<Uuid, i64> = HashMap::new();
    let mut progress: HashMap<u16, DateTime<Utc>> = HashMap::new();
    for (partition, groups) in batches {
        let mut outcome = Outcome::default();
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
                let seen = progress.entry(*partition).or_insert(request.created_at);
                *seen = (*seen).max(request.created_at);
                outcome.decided.push((decision.clone(), request.created_at));
                if matches!(decision.status, OrderStatus::Pending | OrderStatus::Paid) {
                    outcome.accepted += 1;
                    *issued_per_event.entry(*event_id).or_default() += request.tickets();
                    for &(type_id, quantity) in &request.lines {
                        *issued_per_type.entry(type_id).or_default() += quantity;
                        for _ in 0..quantity {
                            ticket_ids.push(Uuid::now_v7());
                            ticket_orders.push(*order_id);
                            ticket_events.push(*event_id);
                            ticket_types.push(type_id);
                        }
                    }
                } else {
                    outcome.rejected += 1;
                }
                decided.push(decision);
            }
        }
        outcomes.push(outcome);
    }
    if decided.is_empty() {
        tx.commit().await?;
        return Ok(outcomes);
    }

    let ids: Vec<Uuid> = decided.iter().map(|d| d.order_id).collect();
    let statuses: Vec<&str> = decided.iter().map(|d| d.status.as_str()).collect();
    let reasons: Vec<Option<&str>> = decided.iter().map(|d| d.reason).collect();
    let reason_types: Vec<Option<Uuid>> = decided.iter().map(|d| d.reason_type).collect();
    sqlx::query(
        "UPDATE orders o
         SET status = d.status, reason = d.reason, reason_ticket_type_id = d.reason_type, updated_at = now(),
             expires_at = CASE WHEN d.status = 'PENDING' THEN now() + make_interval(secs => $5) END
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[]) AS d(id, status, reason, reason_type)
         WHERE o.id = d.id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&reason_types)
    .bind(hold_ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if !ticket_ids.is_empty() {
        sqlx::query(
            "INSERT INTO tickets (id, order_id, event_id, ticket_type_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[])",
        )
        .bind(&ticket_ids)
        .bind(&ticket_orders)
        .bind(&ticket_events)
        .bind(&ticket_types)
        .execute(&mut *tx)
        .await?;
        let (sold_events, sold_counts): (Vec<Uuid>, Vec<i64>) = issued_per_event.into_iter().unzip();
        let (sold_types, type_counts): (Vec<Uuid>, Vec<i64>) = issued_per_type.into_iter().unzip();
        sqlx::query(
            "WITH types AS (
                 UPDATE ticket_types t SET sold = t.sold + s.issued
                 FROM UNNEST($3::uuid[], $4::int8[]) AS s(id, issued) WHERE t.id = s.id
             )
             UPDATE events e SET sold = e.sold + s.issued
             FROM UNNEST($1::uuid[], $2::int8[]) AS s(id, issued) WHERE e.id = s.id",
        )
        .bind(&sold_events)
        .bind(&sold_counts)
        .bind(&sold_types)
        .bind(&type_counts)
        .execute(&mut *tx)
        .await?;
    }
    record_progress(&mut tx, &progress).await?;
    common::db::notify_order_changes(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// What the buyers of these orders already hold, for the events that cap buyers (one
/// statement, none when no event does): their `ACTIVE` tickets, which are those of their
/// `PENDING` and `PAID` orders. Orders queued ahead of an order are decided before it and
/// counted as they are (`EventStock::take`).
async fn read_holdings<'a>(
    tx: &mut sqlx::PgConnection,
    events: &mut HashMap<Uuid, EventStock>,
    orders: impl Iterator<Item = &'a (Uuid, Request)>,
) -> sqlx::Result<()> {
    let mut pairs: Vec<(Uuid, Uuid)> = orders
        .filter(|(event_id, _)| events.get(event_id).is_some_and(EventStock::caps_buyers))
        .map(|(event_id, request)| (*event_id, request.user_id))
        .collect();
    if pairs.is_empty() {
        return Ok(());
    }
    pairs.sort();
    pairs.dedup();
    let (event_ids, user_ids): (Vec<Uuid>, Vec<Uuid>) = pairs.into_iter().unzip();
    let held: Vec<(Uuid, Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT o.event_id, o.user_id, t.ticket_type_id, count(*)
         FROM UNNEST($1::uuid[], $2::uuid[]) AS b(event_id, user_id)
         JOIN orders o ON o.user_id = b.user_id AND o.event_id = b.event_id AND o.status IN ('PENDING', 'PAID')
         JOIN tickets t ON t.order_id = o.id AND t.status = 'ACTIVE'
         GROUP BY 1, 2, 3",
    )
    .bind(&event_ids)
    .bind(&user_ids)
    .fetch_all(&mut *tx)
    .await?;
    for (event_id, user_id, type_id, count) in held {
        if let Some(event) = events.get_mut(&event_id) {
            *event.held.entry((user_id, None)).or_default() += count;
            *event.held.entry((user_id, Some(type_id))).or_default() += count;
        }
    }
    Ok(())
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
    sqlx::query(
        "INSERT INTO partition_progress AS p (partition, seen_through)
         SELECT * FROM UNNEST($1::int2[], $2::timestamptz[]) ORDER BY 1
         ON CONFLICT (partition) DO UPDATE
         SET seen_through = greatest(p.seen_through, excluded.seen_through), updated_at = now()",
    )
    .bind(&partitions)
    .bind(&times)
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    const GENERAL: Uuid = Uuid::from_u128(0x100);
    const VIP: Uuid = Uuid::from_u128(0x200);
    const BUYER: Uuid = Uuid::from_u128(0x300);

    fn at(minute: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2030, 1, 1, 12, minute, 0).unwrap()
    }

    /// An event of one type without stock of its own (as the seed creates them).
    fn seed_event(available: i64, open: bool) -> EventStock {
        let types = HashMap::from([(GENERAL, TypeStock::default())]);
        EventStock { open, venue_left: available, types, ..Default::default() }
    }

    fn request(order_id: Uuid, lines: &[(Uuid, i64)]) -> Request {
        Request { order_id, user_id: BUYER, created_at: at(0), free: false, lines: lines.to_vec() }
    }

    /// Seed-shaped orders (id, quantity, free) against `stock`: the decisions and the tickets issued.
    fn allocate(stock: &mut EventStock, orders: &[(Uuid, i64, bool)]) -> (Vec<Decision>, i64) {
        let before = stock.venue_left;
        let decisions = orders
            .iter()
            .map(|&(id, quantity, free)| stock.decide(&Request { free, ..request(id, &[(GENERAL, quantity)]) }))
            .collect();
        (decisions, before - stock.venue_left)
    }

    fn outcomes(decisions: &[Decision]) -> Vec<(OrderStatus, Option<&'static str>, Option<Uuid>)> {
        decisions.iter().map(|d| (d.status, d.reason, d.reason_type)).collect()
    }

    const ACCEPTED: (OrderStatus, Option<&str>, Option<Uuid>) = (OrderStatus::Pending, None, None);

    #[test]
    fn allocates_in_arrival_order_and_lets_smaller_orders_fit() {
        let id = ids(4);
        let orders = [(id[0], 3, false), (id[1], 4, false), (id[2], 2, false), (id[3], 1, false)];
        let (decisions, issued) = allocate(&mut seed_event(5, true), &orders);
        let sold_out = (OrderStatus::Rejected, Some(reason::SOLD_OUT), Some(GENERAL));
        assert_eq!(outcomes(&decisions), [ACCEPTED, sold_out, ACCEPTED, sold_out]);
        assert_eq!(issued, 5);
    }

    #[test]
    fn decisions_are_moves_of_the_state_machine() {
        use common::domain::Transition;
        let id = ids(3);
        let (open, _) = allocate(&mut seed_event(2, true), &[(id[0], 1, false), (id[1], 1, true), (id[2], 1, false)]);
        let (closed, _) = allocate(&mut seed_event(1, false), &[(id[2], 1, true)]);
        for decision in open.iter().chain(&closed) {
            let event = match decision.status {
                OrderStatus::Pending => OrderEvent::Allocated,
                OrderStatus::Paid => OrderEvent::AllocatedFree,
                _ => OrderEvent::AllocationRejected,
            };
            assert_eq!(
                OrderStatus::Queued.apply(event),
                Transition::Moves { to: decision.status, releases_tickets: false },
                "{decision:?}"
            );
        }
    }

    #[test]
    fn free_orders_are_paid_when_allocated() {
        let id = ids(3);
        let (decisions, issued) =
            allocate(&mut seed_event(3, true), &[(id[0], 2, true), (id[1], 2, true), (id[2], 1, false)]);
        assert_eq!(
            outcomes(&decisions),
            [
                (OrderStatus::Paid, Some(reason::FREE_ORDER), None),
                (OrderStatus::Rejected, Some(reason::SOLD_OUT), Some(GENERAL)),
                ACCEPTED,
            ]
        );
        assert_eq!(issued, 3);
    }

    #[test]
    fn closed_events_reject_everything() {
        let id = ids(2);
        let (decisions, issued) = allocate(&mut seed_event(100, false), &[(id[0], 1, false), (id[1], 1, true)]);
        assert!(decisions.iter().all(|d| d.reason == Some(reason::EVENT_UNAVAILABLE)));
        assert_eq!(issued, 0);
    }

    #[test]
    fn never_issues_more_than_available() {
        // Every split of 1..=4 tickets over random-ish inputs: issued <= available, and every
        // rejected order asked for more than what is left.
        for available in 0..20i64 {
            let orders: Vec<(Uuid, i64, bool)> = (0..15u128)
                .map(|i| (Uuid::from_u128(i), ((i * 7 + available as u128) % 4 + 1) as i64, i % 3 == 0))
                .collect();
            let (decisions, issued) = allocate(&mut seed_event(available, true), &orders);
            assert!(issued <= available);
            let left = available - issued;
            for (decision, (_, quantity, _)) in decisions.iter().zip(&orders) {
                if decision.status == OrderStatus::Rejected {
                    assert!(*quantity > left, "a rejected order would have fit");
                }
            }
        }
    }

    /// General (no stock of its own) and VIP (2 of its own) under a venue cap of 5.
    fn tiered() -> EventStock {
        let vip = TypeStock { left: Some(2), ..Default::default() };
        let types = HashMap::from([(GENERAL, TypeStock::default()), (VIP, vip)]);
        EventStock { open: true, venue_left: 5, types, ..Default::default() }
    }

    #[test]
    fn types_and_the_venue_cap_run_out_each_with_its_reason() {
        let mut stock = tiered();
        let id = ids(6);
        let decisions: Vec<_> = [
            request(id[0], &[(VIP, 1), (GENERAL, 1)]),
            request(id[1], &[(VIP, 2)]),               // VIP has 1 left
            request(id[2], &[(VIP, 1), (GENERAL, 3)]), // 5 > 3 left in the venue: General is sold out
            request(id[3], &[(VIP, 1)]),               // fits
            request(id[4], &[(GENERAL, 2)]),           // fits: the venue is now full
            request(id[5], &[(VIP, 1)]),               // VIP's own stock is gone first
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let rejected = |reason, t| (OrderStatus::Rejected, Some(reason), t);
        assert_eq!(
            outcomes(&decisions),
            [
                ACCEPTED,
                rejected(reason::SOLD_OUT, Some(VIP)),
                rejected(reason::SOLD_OUT, Some(GENERAL)),
                ACCEPTED,
                ACCEPTED,
                rejected(reason::SOLD_OUT, Some(VIP)),
            ]
        );
        assert_eq!((stock.venue_left, stock.types[&VIP].left), (0, Some(0)));
    }

    #[test]
    fn a_full_venue_is_venue_full_when_every_line_had_its_own_stock() {
        let mut stock = tiered();
        stock.venue_left = 1;
        let decision = stock.decide(&request(Uuid::from_u128(1), &[(VIP, 2)]));
        assert_eq!(outcomes(&[decision]), [(OrderStatus::Rejected, Some(reason::VENUE_FULL), None)]);
        assert_eq!(stock.types[&VIP].left, Some(2), "a refused order takes nothing");
    }

    #[test]
    fn buyer_caps_count_what_the_buyer_holds_and_what_they_just_got() {
        let mut stock = tiered();
        stock.venue_left = 100;
        stock.max_per_buyer = Some(4);
        stock.types.get_mut(&VIP).unwrap().max_per_buyer = Some(1);
        stock.types.get_mut(&VIP).unwrap().left = Some(50);
        stock.held.insert((BUYER, None), 1);
        let id = ids(5);
        let other = Request { user_id: Uuid::from_u128(0x999), ..request(id[4], &[(GENERAL, 4)]) };
        let decisions: Vec<_> = [
            request(id[0], &[(VIP, 1), (GENERAL, 1)]), // holds 3
            request(id[1], &[(VIP, 1)]),               // VIP cap 1
            request(id[2], &[(GENERAL, 2)]),           // 5 > 4
            request(id[3], &[(GENERAL, 1)]),           // holds 4
            other,                                     // another buyer's cap is their own
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let limit = |t| (OrderStatus::Rejected, Some(reason::BUYER_LIMIT), t);
        assert_eq!(outcomes(&decisions), [ACCEPTED, limit(Some(VIP)), limit(None), ACCEPTED, ACCEPTED]);
    }

    #[test]
    fn sale_windows_are_judged_at_arrival() {
        let mut stock = tiered();
        let vip = stock.types.get_mut(&VIP).unwrap();
        vip.sales_start = Some(at(10));
        vip.sales_end = Some(at(20));
        let id = ids(4);
        let arriving = |id, minute| Request { created_at: at(minute), ..request(id, &[(VIP, 1)]) };
        let decisions: Vec<_> = [arriving(id[0], 9), arriving(id[1], 10), arriving(id[2], 19), arriving(id[3], 20)]
            .iter()
            .map(|r| stock.decide(r))
            .collect();
        let closed = (OrderStatus::Rejected, Some(reason::NOT_ON_SALE), Some(VIP));
        assert_eq!(outcomes(&decisions), [closed, ACCEPTED, ACCEPTED, closed]);
        stock.types.get_mut(&VIP).unwrap().withdrawn = true;
        let unknown = Uuid::from_u128(0xdead);
        let late: Vec<_> =
            [arriving(id[0], 15), request(id[1], &[(unknown, 1)])].iter().map(|r| stock.decide(r)).collect();
        assert_eq!(outcomes(&late), [closed, (OrderStatus::Rejected, Some(reason::NOT_ON_SALE), Some(unknown))]);
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
