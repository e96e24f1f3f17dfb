//! The partition consumers (this module) and the batch allocator ([`decide`]).
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

/// A batch takes messages already delivered, without waiting, up to this many times
/// `BATCH_SIZE` orders.
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
            // A backlog: messages already delivered (prefetched) join the batch without
            // waiting, up to BACKLOG_BATCH_FACTOR × BATCH_SIZE orders, so batches grow with
            // the queue and a long queue costs fewer transactions per order.
            let most = usize::from(self.config.batch_size) * BACKLOG_BATCH_FACTOR;
            while orders < most {
                let Some(delivery) = consumer.next().now_or_never() else { break };
                let delivery = next_delivery(delivery)?;
                orders += orders_in(&delivery);
                batch.push(delivery);
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
    for (&kind, &uses) in &outcome.promo_uses {
        metrics::counter!("turnstile_promo_code_uses_total", "outcome" => kind).increment(uses);
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
