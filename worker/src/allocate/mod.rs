//! The partition consumers (this module) and the batch allocator ([`decide`]).
//!
//! One task per partition queue consumes with a bounded prefetch and takes a batch
//! (messages until they name `BATCH_SIZE` orders, or what arrived within `BATCH_WAIT_MS` of
//! the first, and more while the batch before it is being decided; a message names the
//! orders the api stored together). The batch goes to the decider, which decides every batch
//! waiting at that moment in one transaction: lock their event rows
//! ([`common::sales::lock_events`]), read their ticket types and still-`QUEUED` orders (and,
//! for events with a buyer cap, what those buyers hold), decide each event's orders in
//! arrival order, all lines or nothing, against each type's stock and the venue cap
//! (`capacity - sold`), write the outcomes with their tickets and `sold`
//! ([`common::sales::allocate`]) and how far each partition has got, commit.
//! Only then is the batch acked, so a crash at any point leads to redelivery, and
//! redelivery is harmless because an order that is no longer `QUEUED` is skipped. A
//! partition's next batch goes to the decider only once the one before it has committed, so
//! its batches are decided in their order, a failed one retried before the next.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use common::amqp::{PurchaseMessage, declare_topology, decode_purchase, purchase_queue};
use common::config::WorkerConfig;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::membership::Assignment;
use crate::retry::Backoff;

mod decide;

pub use decide::{BatchOutcome, Job, decider};

/// A batch takes the messages that arrive while the batch before it is being decided, and
/// those already delivered, up to this many times `BATCH_SIZE` orders.
const BACKLOG_BATCH_FACTOR: usize = 4;

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
pub(crate) type Groups = Vec<(Uuid, Vec<Uuid>)>;

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

    /// Takes batches and has them decided, one partition's batches in their order: a batch
    /// is handed to the decider only once the one before it has been decided (committed). While
    /// one is being decided, the next is gathered (its messages decoded as they arrive), so that
    /// it goes to the decider as soon as the one before it is done, and the decided one is
    /// acked and recorded after that.
    async fn consume_batches(
        &self,
        partition: u16,
        channel: &Channel,
        consumer: &mut Consumer,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Ended> {
        let mut rebalance = tokio::time::interval(self.config.heartbeat());
        rebalance.tick().await;
        let mut deciding: Option<Submitted> = None;
        let ended = loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                _ = rebalance.tick() => {
                    if self.assignment.borrow().prefers(partition) {
                        continue;
                    }
                    break Ended::SteppedBack;
                }
                result = outcome_of(&mut deciding) => {
                    let Some(submitted) = deciding.take() else { unreachable!("an outcome of no batch") };
                    if !self.settle(partition, channel, submitted.batch, result, shutdown).await? {
                        return Ok(Ended::Shutdown);
                    }
                    continue;
                }
                delivery = consumer.next() => next_delivery(delivery)?,
            };
            let (gathered, decided) = self.gather(partition, consumer, first, &mut deciding).await?;
            let batch = Batch::of(partition, gathered);
            let previous = match deciding.take() {
                Some(submitted) => {
                    let result = match decided {
                        Some(result) => result,
                        None => received(submitted.outcome).await,
                    };
                    let Some(previous) = self.resolve(partition, submitted.batch, result, shutdown).await else {
                        return Ok(Ended::Shutdown);
                    };
                    Some(previous)
                }
                None => None,
            };
            let outcome = self.submit(partition, &batch.groups).await;
            deciding = Some(Submitted { batch, outcome });
            if let Some((batch, outcome)) = previous {
                self.finish(partition, channel, batch, outcome).await?;
            }
        };
        if let Some(submitted) = deciding.take() {
            let result = received(submitted.outcome).await;
            if !self.settle(partition, channel, submitted.batch, result, shutdown).await? {
                return Ok(Ended::Shutdown);
            }
        }
        Ok(ended)
    }

    /// Gathers a batch from its first message: messages until they name `BATCH_SIZE`
    /// orders or `BATCH_WAIT_MS` has passed; then, while the batch before it is still being
    /// decided, the messages that arrive, and last those already delivered (prefetched),
    /// without waiting, up to `BACKLOG_BATCH_FACTOR` × `BATCH_SIZE` orders, so that batches grow
    /// with the queue and a long queue costs fewer transactions per order. Returns the batch,
    /// and the outcome of the batch being decided if it came meanwhile.
    async fn gather(
        &self,
        partition: u16,
        consumer: &mut Consumer,
        first: Delivery,
        deciding: &mut Option<Submitted>,
    ) -> anyhow::Result<(Gathering, Option<Result<BatchOutcome, String>>)> {
        let size = usize::from(self.config.batch_size);
        let most = size * BACKLOG_BATCH_FACTOR;
        let mut batch = Gathering::default();
        batch.push(partition, first).await?;
        let mut decided = None;
        let deadline = tokio::time::Instant::now() + self.config.batch_wait();
        loop {
            // Open: neither full nor past its wait. Waiting: the batch before it is still
            // being decided, so it may take more.
            let open = batch.orders.len() < size && tokio::time::Instant::now() < deadline;
            let waiting = deciding.is_some() && decided.is_none();
            if !(open || waiting && batch.orders.len() < most) {
                break;
            }
            tokio::select! {
                result = outcome_of(deciding), if waiting => decided = Some(result),
                _ = tokio::time::sleep_until(deadline), if open => {}
                delivery = consumer.next() => batch.push(partition, next_delivery(delivery)?).await?,
            }
        }
        while batch.orders.len() < most {
            let Some(delivery) = consumer.next().now_or_never() else { break };
            batch.push(partition, next_delivery(delivery)?).await?;
        }
        Ok((batch, decided))
    }

    /// Hands a batch's orders to the decider; the receiver gives its outcome (an error if the
    /// decider has stopped).
    async fn submit(&self, partition: u16, groups: &Groups) -> oneshot::Receiver<Result<BatchOutcome, String>> {
        let (done, outcome) = oneshot::channel();
        // If the decider has stopped, the job (and `done`) is dropped and `outcome` says so.
        let _ = self.jobs.send(Job { partition, groups: groups.clone(), done }).await;
        outcome
    }

    /// A batch's outcome, the batch submitted again (after a back-off) for as long as its
    /// transaction fails. `None`: shutdown began while the database was failing; the batch is
    /// left unacked (the channel's closing requeues it).
    async fn resolve(
        &self,
        partition: u16,
        batch: Batch,
        mut result: Result<BatchOutcome, String>,
        shutdown: &CancellationToken,
    ) -> Option<(Batch, BatchOutcome)> {
        let mut backoff = Backoff::default();
        loop {
            match result {
                Ok(outcome) => return Some((batch, outcome)),
                Err(err) => {
                    tracing::warn!(partition, events = batch.groups.len(), error = %err, "allocation failed; retrying");
                    if !backoff.wait(shutdown).await {
                        return None;
                    }
                    result = received(self.submit(partition, &batch.groups).await).await;
                }
            }
        }
    }

    /// [`Self::resolve`], then [`Self::finish`]. `Ok(false)`: shutdown began while the
    /// database was failing.
    async fn settle(
        &self,
        partition: u16,
        channel: &Channel,
        batch: Batch,
        result: Result<BatchOutcome, String>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let Some((batch, outcome)) = self.resolve(partition, batch, result, shutdown).await else { return Ok(false) };
        self.finish(partition, channel, batch, outcome).await?;
        Ok(true)
    }

    /// Acks a decided batch and records its decisions, in the batch's span. The batch has a
    /// span of its own, linked to the trace of every order in it (exported with the spans
    /// when OTLP is on); each order's decision is logged with the order's own `trace_id`, the
    /// one the api logged when it accepted the order.
    async fn finish(
        &self,
        partition: u16,
        channel: &Channel,
        batch: Batch,
        totals: BatchOutcome,
    ) -> anyhow::Result<()> {
        let span = batch.span.clone();
        async move {
            if let Some(tag) = batch.last_tag {
                channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
            }
            record_decisions(&totals, &batch.traces);
            metrics::histogram!("turnstile_allocation_batch_orders").record(batch.orders as f64);
            metrics::histogram!("turnstile_allocation_batch_duration_seconds")
                .record(batch.started.elapsed().as_secs_f64());
            tracing::info!(
                partition,
                worker_id = %self.worker_id,
                messages = batch.received,
                accepted = totals.accepted,
                rejected = totals.rejected,
                skipped = totals.skipped,
                elapsed_ms = batch.started.elapsed().as_millis() as u64,
                "batch committed"
            );
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// A batch's messages, decoded as they arrive.
struct Gathering {
    started: Instant,
    received: usize,
    orders: Vec<PurchaseMessage>,
    last_tag: Option<u64>,
}

impl Default for Gathering {
    fn default() -> Self {
        Self { started: Instant::now(), received: 0, orders: Vec::new(), last_tag: None }
    }
}

impl Gathering {
    /// Adds a delivery's orders; an undecodable delivery goes to the dead-letter queue.
    async fn push(&mut self, partition: u16, delivery: Delivery) -> anyhow::Result<()> {
        self.received += 1;
        match decode_purchase(&delivery.data) {
            Ok(orders) => {
                self.orders.extend(orders);
                self.last_tag = Some(delivery.delivery_tag);
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
        Ok(())
    }
}

/// A gathered batch, its orders grouped by event for the decider.
struct Batch {
    span: tracing::Span,
    started: Instant,
    received: usize,
    orders: usize,
    last_tag: Option<u64>,
    /// Each order's trace id, for its `order decided` line. (Not skipped when that line is
    /// not logged: `tracing::enabled!` confuses the per-layer filters of the subscriber, and
    /// the log lines that follow it lose their span.)
    traces: HashMap<Uuid, String>,
    groups: Groups,
}

impl Batch {
    fn of(partition: u16, gathered: Gathering) -> Self {
        let span = tracing::info_span!("batch", partition, messages = gathered.received);
        metrics::counter!("turnstile_purchase_messages_consumed_total").increment(gathered.received as u64);
        let messages = gathered.orders;
        let traces = messages
            .iter()
            .filter_map(|m| Some((m.order_id, common::telemetry::trace_id_of(m.traceparent.as_deref()?)?)))
            .collect();
        if common::telemetry::exporting() {
            for context in messages.iter().filter_map(|m| common::telemetry::remote_span(m.traceparent.as_deref()?)) {
                span.add_link(context);
            }
        }
        Self {
            span,
            started: gathered.started,
            received: gathered.received,
            orders: messages.len(),
            last_tag: gathered.last_tag,
            traces,
            groups: group_by_event(&messages),
        }
    }
}

/// A batch the decider has.
struct Submitted {
    batch: Batch,
    outcome: oneshot::Receiver<Result<BatchOutcome, String>>,
}

/// The outcome of the batch being decided; never, if there is none.
async fn outcome_of(deciding: &mut Option<Submitted>) -> Result<BatchOutcome, String> {
    match deciding {
        Some(submitted) => received(&mut submitted.outcome).await,
        None => std::future::pending().await,
    }
}

async fn received(
    outcome: impl Future<Output = Result<Result<BatchOutcome, String>, oneshot::error::RecvError>>,
) -> Result<BatchOutcome, String> {
    outcome.await.unwrap_or_else(|_| Err("the decider stopped".to_owned()))
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
    for (&kind, &uses) in &outcome.promo_uses {
        metrics::counter!("turnstile_promo_code_uses_total", "outcome" => kind).increment(uses);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
