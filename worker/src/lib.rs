//! Turnstile's worker as a library: [`run`] is the whole process but its command line
//! ([`cli`]), and [`Worker`] the same in parts, for tests that run it in their own process.
//! It consumes the purchase partitions and allocates tickets ([`allocate`]), shares the
//! partitions with other workers ([`membership`]), re-publishes orders whose message may be
//! missing ([`republish`]), expires unpaid holds ([`expiry`]), relays order events to the
//! exchange and to webhook deliveries ([`relay`]) and sends those ([`deliveries`]), all
//! under one shutdown token: once it is cancelled (SIGTERM or Ctrl-C in the binary) it stops
//! consuming, lets the batch in hand finish (or leaves it unacked for redelivery) and
//! returns.

// Functions stay under 80 lines (clippy.toml) outside tests.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

mod allocate;
pub mod cli;
mod deliveries;
mod draws;
mod expiry;
mod health;
mod membership;
mod poll;
mod relay;
mod republish;
mod retry;

use std::sync::Arc;

use anyhow::Context;
use common::config::WorkerConfig;
use common::supervise::Tasks;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::allocate::Allocator;
use crate::membership::Assignment;

/// Runs the worker until `shutdown` is cancelled (or a task ends early: the error names it).
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Worker::build(config, shutdown).await?.run_until_stopped().await
}

/// A worker with every task started: what [`run`] runs, and what tests run in their own
/// process, where they can also wait for it to be [`ready`](Self::ready) and [`step`](Steps)
/// its polling loops instead of sleeping past their intervals.
pub struct Worker {
    tasks: Tasks,
    db: sqlx::PgPool,
    amqp: common::amqp::Pool,
    worker_id: Uuid,
    partitions: u16,
    subscribed: Arc<Semaphore>,
    ready: watch::Sender<bool>,
    steps: Steps,
    shutdown: CancellationToken,
}

/// Runs a round of one of a worker's polling loops now (see [`poll::Stepper::step`]): each
/// returns once a round begun after the call found nothing more to do, `false` if the loop
/// has stopped.
#[derive(Clone)]
pub struct Steps {
    draws: poll::Stepper,
    expiry: poll::Stepper,
    republish: poll::Stepper,
    relay: poll::Stepper,
    deliveries: poll::Stepper,
}

impl Steps {
    /// Draws the pre-sales that are due.
    pub async fn draws(&self) -> bool {
        self.draws.step().await
    }

    /// Expires the holds that are due (and finishes deletions left unfinished).
    pub async fn expiry(&self) -> bool {
        self.expiry.step().await
    }

    /// Re-publishes the `QUEUED` orders whose message may be missing.
    pub async fn republish(&self) -> bool {
        self.republish.step().await
    }

    /// Relays every status change not yet relayed (to `orders.events` and webhook deliveries).
    pub async fn relay(&self) -> bool {
        self.relay.step().await
    }

    /// Sends the webhook deliveries that are due.
    pub async fn deliveries(&self) -> bool {
        self.deliveries.step().await
    }
}

impl Worker {
    /// Connects, migrates, declares the queues, binds the metrics address and starts every
    /// task. Cancelling `shutdown` stops them as SIGTERM does.
    pub async fn build(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let metrics = common::metrics::install("worker")?;
        describe_metrics();
        let db = common::db::connect(&config.database).await.context("connecting to PostgreSQL")?;
        common::db::migrate(&db).await.context("applying migrations")?;
        // Each partition consumer holds a connection of its own (one broken connection costs
        // one partition a reconnect); the re-publisher and the events relay hold one more each.
        let amqp = common::amqp::pool(&config.broker, usize::from(config.broker.partitions) + 3)
            .context("creating the AMQP pool")?;
        let mut tasks = Tasks::new(shutdown.clone());
        let config = Arc::new(config);
        let partitions = config.broker.partitions;
        let worker_id = Uuid::now_v7();
        let probe = health::Probe::new(db.clone(), partitions, tasks.failed());
        tasks.spawn("metrics upkeep", common::metrics::upkeep(metrics.clone(), shutdown.clone()));
        let serving =
            common::metrics::serve(config.metrics_addr, health::router(probe.clone(), metrics), shutdown.clone())
                .await?;
        tasks.spawn("metrics server", serving);
        metrics::gauge!("turnstile_partitions").set(f64::from(partitions));

        declare_topology(&amqp, partitions, &shutdown).await;

        let (assignment_tx, assignment) = watch::channel(Assignment::ALONE);
        tasks.spawn(
            "membership",
            membership::run(db.clone(), worker_id, config.heartbeat(), partitions, assignment_tx, shutdown.clone()),
        );

        // The decider ends once every partition consumer has (they hold its queue's senders).
        let (jobs, decider) = allocate::decider(db.clone(), config.hold_ttl());
        tasks.spawn("allocation decider", decider);
        let allocator =
            Arc::new(Allocator { amqp: amqp.clone(), config: config.clone(), worker_id, assignment, jobs, probe });
        let subscribed = Arc::new(Semaphore::new(0));
        for partition in 0..partitions {
            tasks.spawn(
                format!("partition {partition} consumer"),
                allocator.clone().run_partition(partition, subscribed.clone(), shutdown.clone()),
            );
        }
        drop(allocator);
        let steps = Self::spawn_loops(&mut tasks, &db, &amqp, &config, &shutdown)?;
        let (ready, _) = watch::channel(false);
        Ok(Self { tasks, db, amqp, worker_id, partitions, subscribed, ready, steps, shutdown })
    }

    /// Starts the polling loops; the handles that step them.
    fn spawn_loops(
        tasks: &mut Tasks,
        db: &sqlx::PgPool,
        amqp: &common::amqp::Pool,
        config: &Arc<WorkerConfig>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Steps> {
        let partitions = config.broker.partitions;
        let (republish, republish_steps) = poll::Steps::new();
        let publisher = common::amqp::Publisher::new(amqp.clone(), partitions);
        tasks.spawn(
            "re-publisher",
            republish::run(db.clone(), publisher, config.clone(), republish_steps, shutdown.clone()),
        );
        let (draws, draw_steps) = poll::Steps::new();
        let publisher = common::amqp::Publisher::new(amqp.clone(), partitions);
        // As often as holds expire: a pre-sale is drawn within that of its opening.
        let interval = config.expiry_interval();
        tasks.spawn("draws", draws::run(db.clone(), publisher, partitions, interval, draw_steps, shutdown.clone()));
        let (expiry, expiry_steps) = poll::Steps::new();
        let (interval, offer_ttl) = (config.expiry_interval(), config.waitlist.offer_ttl());
        tasks.spawn("expiry", expiry::run(db.clone(), interval, offer_ttl, expiry_steps, shutdown.clone()));
        let (relay, relay_steps) = poll::Steps::new();
        tasks.spawn(
            "order events relay",
            relay::run(
                db.clone(),
                common::amqp::ConfirmChannel::new(amqp.clone(), partitions),
                config.events_relay_interval(),
                config.order_events_format,
                relay_steps,
                shutdown.clone(),
            ),
        );
        let (deliveries, delivery_steps) = poll::Steps::new();
        let deliverer =
            Arc::new(deliveries::Deliverer::new(db.clone(), config).context("building the webhook client")?);
        tasks.spawn(
            "webhook deliverer",
            deliverer.run(config.webhook_poll_interval(), delivery_steps, shutdown.clone()),
        );
        Ok(Steps { draws, expiry, republish, relay, deliveries })
    }

    /// Its polling loops' step handles.
    pub fn steps(&self) -> Steps {
        self.steps.clone()
    }

    /// `true` once it is subscribed to every partition (when it logs "worker ready").
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs until shutdown (or until a task ends early: the error names it), then closes
    /// its connections.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { tasks, db, amqp, worker_id, partitions, subscribed, ready, shutdown, .. } = self;
        let announce_ready = async {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                permits = subscribed.acquire_many(u32::from(partitions)) => {
                    drop(permits);
                    tracing::info!(%worker_id, partitions, "worker ready");
                    ready.send_replace(true);
                }
            }
            shutdown.cancelled().await;
            tracing::info!("shutting down: finishing the batches in hand");
        };
        let (supervised, ()) = tokio::join!(tasks.supervise(), announce_ready);
        amqp.close();
        db.close().await;
        tracing::info!("worker stopped");
        supervised
    }
}

fn describe_metrics() {
    describe_allocation_metrics();
    describe_delivery_metrics();
    start_at_zero();
}

/// The purchase pipeline's metrics: messages, batches, decisions, partitions, expiry.
fn describe_allocation_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "turnstile_purchase_messages_consumed_total",
        "Purchase messages taken from the partition queues."
    );
    describe_counter!(
        "turnstile_purchase_messages_dead_lettered_total",
        "Purchase messages that could not be read, sent to orders.purchase.dead."
    );
    describe_histogram!("turnstile_allocation_batch_orders", "Orders in one partition's batch.");
    describe_histogram!(
        "turnstile_allocation_batch_duration_seconds",
        metrics::Unit::Seconds,
        "From a partition batch's first message to its ack (decided and committed)."
    );
    describe_histogram!(
        "turnstile_allocation_transaction_duration_seconds",
        metrics::Unit::Seconds,
        "One allocation transaction (the partition batches waiting at once)."
    );
    describe_counter!(
        "turnstile_orders_decided_total",
        "Orders decided by the allocator, by status (PENDING, PAID, REJECTED) and reason (NONE, FREE_ORDER, SOLD_OUT, EVENT_UNAVAILABLE)."
    );
    describe_counter!(
        "turnstile_orders_skipped_total",
        "Orders named by purchase messages that were no longer QUEUED (redeliveries, re-publishes)."
    );
    describe_histogram!(
        "turnstile_order_decision_latency_seconds",
        metrics::Unit::Seconds,
        "From an order's acceptance by the api (created_at) to its decision's commit."
    );
    describe_gauge!("turnstile_partitions", "Purchase partitions configured (PARTITIONS).");
    describe_gauge!(
        "turnstile_partitions_preferred",
        "Partitions this worker prefers (it is their consumer when all workers agree)."
    );
    describe_gauge!("turnstile_partitions_subscribed", "Partition queues this worker's consumers are subscribed to.");
    describe_counter!("turnstile_orders_republished_total", "QUEUED orders whose purchase message was sent again.");
    describe_counter!("turnstile_holds_expired_total", "PENDING orders expired (unpaid holds released).");
    describe_gauge!(
        "turnstile_queued_orders",
        "Orders numbered in their event's queue and not yet decided, by partition (read every 5 draw rounds)."
    );
    describe_histogram!(
        "turnstile_draw_duration_seconds",
        metrics::Unit::Seconds,
        "One pre-sale draw: numbering an event's entries in draw order (the transaction)."
    );
    describe_counter!("turnstile_draw_entries_total", "Pre-sale entries numbered by draws.");
    describe_counter!(
        "turnstile_waitlist_offers_total",
        "Waiting-list offers made from tickets this process released (expired holds)."
    );
}

/// The outcomes' metrics: the order events relay and webhook deliveries.
fn describe_delivery_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "turnstile_relay_lag_seconds",
        "Age of the oldest status change not yet relayed (0 when none waits)."
    );
    describe_counter!(
        "turnstile_order_events_published_total",
        "Order events relayed to orders.events (and to webhook deliveries)."
    );
    describe_counter!(
        "turnstile_order_event_messages_published_total",
        "Messages published to orders.events (one carries several events in batch format)."
    );
    describe_counter!(
        "turnstile_webhook_deliveries_total",
        "Webhook delivery attempts by outcome (delivered, retrying, given_up, gone)."
    );
    describe_histogram!(
        "turnstile_webhook_delivery_duration_seconds",
        metrics::Unit::Seconds,
        "How long a webhook endpoint took to answer (or to fail)."
    );
    describe_gauge!("turnstile_webhook_deliveries_pending", "Webhook deliveries waiting to be sent or retried.");
}

/// Counters with a fixed set of labels, at zero from the start, so that rates and alerts
/// work before the first event.
fn start_at_zero() {
    for name in [
        "turnstile_purchase_messages_consumed_total",
        "turnstile_purchase_messages_dead_lettered_total",
        "turnstile_orders_skipped_total",
        "turnstile_orders_republished_total",
        "turnstile_holds_expired_total",
        "turnstile_draw_entries_total",
        "turnstile_waitlist_offers_total",
        "turnstile_order_events_published_total",
        "turnstile_order_event_messages_published_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for (status, reason) in
        [("PENDING", "NONE"), ("PAID", "FREE_ORDER"), ("REJECTED", "SOLD_OUT"), ("REJECTED", "EVENT_UNAVAILABLE")]
    {
        metrics::counter!("turnstile_orders_decided_total", "status" => status, "reason" => reason).increment(0);
    }
    for outcome in ["delivered", "retrying", "given_up", "gone"] {
        metrics::counter!("turnstile_webhook_deliveries_total", "outcome" => outcome).increment(0);
    }
    metrics::gauge!("turnstile_partitions_subscribed").set(0.0);
}

/// Declares the queues once, before the consumers subscribe to them, retrying until the
/// broker answers (or shutdown).
async fn declare_topology(amqp: &common::amqp::Pool, partitions: u16, shutdown: &tokio_util::sync::CancellationToken) {
    let mut backoff = retry::Backoff::default();
    loop {
        let result = async {
            let connection = amqp.get().await?;
            let channel = connection.create_channel().await?;
            common::amqp::declare_topology(&channel, partitions).await?;
            let _ = channel.close(200, "topology declared".into()).await;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(err) => tracing::warn!(error = format!("{err:#}"), "cannot declare the queues yet; retrying"),
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}
