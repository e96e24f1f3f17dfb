//! RabbitMQ: the connection pool, the purchase topology (declared by one function that api
//! and worker both call), the partition hash, the purchase message and a publisher that
//! waits for the broker's confirm.
//!
//! Topology:
//! ```text
//! exchange orders.purchase (direct) --"k"--> quorum queue orders.purchase.{k}, k in 0..N
//!                                              x-single-active-consumer: true
//!                                              dead letters -> exchange orders.purchase.dlx (fanout)
//!                                                              -> queue orders.purchase.dead
//! exchange orders.events (topic) --"order.<status>"--> queues of the consumers' own
//! ```
//! An order's message goes to partition `partition_of(event_id, N)`, so all orders of one
//! event sit in one queue and are allocated in arrival order by its single active consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, PoolConfig, RecycleError, RecycleResult, Timeouts};
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::BrokerConfig;

pub const PURCHASE_EXCHANGE: &str = "orders.purchase";
pub const PURCHASE_DEAD_LETTER_EXCHANGE: &str = "orders.purchase.dlx";
pub const PURCHASE_DEAD_LETTER_QUEUE: &str = "orders.purchase.dead";
/// Topic exchange of order status changes (`order.<status>`, see `common::notifications`).
pub const ORDER_EVENTS_EXCHANGE: &str = "orders.events";

/// How long a publisher waits for the broker's confirm before it treats the publish as
/// failed (the order then stays with the re-publisher).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of broker connections (see [`pool`]).
pub type Pool = managed::Pool<Manager>;
/// A connection lent by the [`Pool`].
pub type Object = managed::Object<Manager>;

/// How long one broker address may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes the pool's connections: to the first of the broker's addresses that answers,
/// starting from the one that answered last, so that when a node of a cluster goes away,
/// the next connection (a consumer resubscribing, a publisher's retry, the relay) goes to a
/// live one. Everything built on a connection (channels, consumers, publishes awaiting
/// their confirm) fails with it, and its owner retries on a new one.
pub struct Manager {
    addresses: Vec<String>,
    /// The index of the address that answered last.
    current: AtomicUsize,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Addresses carry credentials: only how many there are.
        f.debug_struct("Manager").field("addresses", &self.addresses.len()).finish_non_exhaustive()
    }
}

impl Manager {
    /// `addresses`: one or more AMQP URLs, comma-separated (a cluster's nodes).
    pub fn new(addresses: &str) -> anyhow::Result<Self> {
        let addresses: Vec<String> =
            addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
        anyhow::ensure!(!addresses.is_empty(), "AMQP_URL names no broker address");
        for address in &addresses {
            address
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|err| anyhow::anyhow!("AMQP_URL: an address is not an AMQP URL: {err}"))?;
        }
        Ok(Self { addresses, current: AtomicUsize::new(0) })
    }

    /// Where `address` points, without its credentials, for logs.
    fn host_of(address: &str) -> String {
        address
            .parse::<lapin::uri::AMQPUri>()
            .map_or_else(|_| "?".to_owned(), |uri| format!("{}:{}", uri.authority.host, uri.authority.port))
    }
}

impl managed::Manager for Manager {
    type Type = lapin::Connection;
    type Error = lapin::Error;

    async fn create(&self) -> Result<lapin::Connection, lapin::Error> {
        let first = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..self.addresses.len() {
            let index = (first + step) % self.addresses.len();
            let address = &self.addresses[index];
            let connecting = lapin::Connection::connect(address, ConnectionProperties::default());
            let error = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(connection)) => {
                    if index != first {
                        tracing::info!(broker = Self::host_of(address), "connected to another broker address");
                    }
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(connection);
                }
                Ok(Err(error)) => error,
                Err(_) => lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the broker did not accept the connection in time",
                )),
            };
            if self.addresses.len() > 1 {
                tracing::warn!(broker = Self::host_of(address), error = %error, "broker address unreachable; trying the next");
            }
            last_error = Some(error);
        }
        Err(last_error
            .unwrap_or_else(|| lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into()))
    }

    async fn recycle(&self, connection: &mut lapin::Connection, _: &Metrics) -> RecycleResult<lapin::Error> {
        if connection.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!("the broker connection is lost: {:?}", connection.status())))
        }
    }
}

/// A lazily connecting pool of up to `connections` connections: creating it never touches
/// the network, so a process starts (and reports itself not ready) while the broker is
/// down, and reconnects when it returns, to any of `AMQP_URL`'s addresses (see
/// [`Manager`]). A pooled connection is lent exclusively, so a holder of a long-lived
/// connection (a partition consumer) counts against `connections`.
pub fn pool(config: &BrokerConfig, connections: usize) -> anyhow::Result<Pool> {
    let timeouts = Timeouts {
        wait: Some(Duration::from_secs(5)),
        create: Some(CONNECT_TIMEOUT * 3),
        recycle: Some(Duration::from_secs(5)),
    };
    let manager = Manager::new(config.url.expose())?;
    Ok(Pool::builder(manager)
        .config(PoolConfig { max_size: connections, timeouts, ..PoolConfig::default() })
        .runtime(deadpool::Runtime::Tokio1)
        .build()?)
}

/// The name of partition `k`'s queue.
pub fn purchase_queue(partition: u16) -> String {
    format!("{PURCHASE_EXCHANGE}.{partition}")
}

/// The partition of an event: FNV-1a (64 bit) of the id's 16 bytes, modulo `partitions`.
///
/// This must never change between versions: api and worker processes of different builds
/// share the queues, and all orders of one event must meet in one partition. The tests pin
/// its values.
pub fn partition_of(event_id: Uuid, partitions: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = event_id.as_bytes().iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME));
    // `partitions` is at least 1 (configuration enforces it); the remainder fits in u16.
    (hash % u64::from(partitions.max(1))) as u16
}

/// Declares the topology (purchase partitions, dead letters, order events). Idempotent: every process calls it on each channel it
/// opens, with the same arguments (RabbitMQ refuses a re-declaration that differs).
pub async fn declare_topology(channel: &Channel, partitions: u16) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(PURCHASE_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    channel
        .exchange_declare(PURCHASE_DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await?;
    channel.exchange_declare(ORDER_EVENTS_EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut dead_args = FieldTable::default();
    dead_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(PURCHASE_DEAD_LETTER_QUEUE.into(), queue_options, dead_args).await?;
    channel
        .queue_bind(
            PURCHASE_DEAD_LETTER_QUEUE.into(),
            PURCHASE_DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for partition in 0..partitions {
        let queue: ShortString = purchase_queue(partition).into();
        channel.queue_declare(queue.clone(), queue_options, partition_queue_arguments()).await?;
        channel
            .queue_bind(
                queue,
                PURCHASE_EXCHANGE.into(),
                partition.to_string().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

fn partition_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    // One consumer at a time per partition: orders of one event are allocated in the order
    // they arrived, and a standby consumer takes over when the active one goes away.
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // Messages the worker cannot decode are rejected to here instead of blocking the queue.
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(PURCHASE_DEAD_LETTER_EXCHANGE.into()));
    args
}

/// One order in a purchase message. The order row is the source of truth; the message only
/// says which order to look at, which event (to group a batch without a query), and the
/// order's trace (the W3C `traceparent` of the request that placed it), which the worker
/// continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseMessage {
    pub order_id: Uuid,
    pub event_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The body of a purchase message: the orders of one partition that were stored together,
/// in the order they were accepted. One message per stored batch and partition rather than
/// per order: a persistent message on a quorum queue costs the broker the same whether it
/// names one order or hundreds, and the order, not the message, is the unit of
/// idempotency (the worker skips an order that is no longer `QUEUED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseBatch {
    pub orders: Vec<PurchaseMessage>,
}

/// Reads a purchase message: a [`PurchaseBatch`], or a single [`PurchaseMessage`] (what
/// earlier versions sent, one per order; still read, so that messages queued before an
/// upgrade are decided after it).
pub fn decode_purchase(body: &[u8]) -> Result<Vec<PurchaseMessage>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Body {
        Batch(PurchaseBatch),
        One(PurchaseMessage),
    }
    match serde_json::from_slice(body)? {
        Body::Batch(batch) => Ok(batch.orders),
        Body::One(one) => Ok(vec![one]),
    }
}

/// Why a publish did not end in a broker confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker refused the message")]
    Nacked,
    #[error("no queue is bound for partition {0}")]
    Unroutable(u16),
}

impl PublishError {
    /// The `outcome` label of `turnstile_purchase_publishes_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
            Self::Nacked => "nacked",
            Self::Unroutable(_) => "unroutable",
        }
    }
}

/// Publishes purchase messages on one shared confirm-mode channel, re-opened (and the
/// topology re-declared) after a failure. Many requests publish concurrently on the channel
/// and each awaits its own confirm, which is what makes confirms cheap (the round trip, not
/// the broker, limits a serial publisher).
///
/// After a failure the publisher stays "open-circuit" for [`RETRY_AFTER_FAILURE`]: publishes
/// fail at once instead of each waiting out a timeout, so a broker outage does not slow the
/// api's answers (the orders wait for the re-publisher instead).
pub struct Publisher {
    pool: Pool,
    partitions: u16,
    state: Arc<PublisherState>,
}

/// What a pending confirm needs after its publish call returned.
struct PublisherState {
    channel: tokio::sync::Mutex<Option<Channel>>,
    failed_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Messages sent and not yet confirmed, at most [`PUBLISH_WINDOW`]: when the broker falls
    /// behind, senders wait here instead of piling up unconfirmed messages.
    window: Arc<tokio::sync::Semaphore>,
}

/// The most messages a publisher has sent without their confirm.
pub const PUBLISH_WINDOW: usize = 256;

impl PublisherState {
    /// Opens the circuit and drops the channel, so the next publish opens a fresh one.
    async fn failed(&self) {
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
        if let Some(channel) = self.channel.lock().await.take() {
            let _ = channel.close(200, "reset after a failed publish".into()).await;
        }
    }
}

/// How long after a failed publish the next one is attempted for real.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl Publisher {
    pub fn new(pool: Pool, partitions: u16) -> Self {
        let state = PublisherState {
            channel: tokio::sync::Mutex::new(None),
            failed_at: std::sync::Mutex::new(None),
            window: Arc::new(tokio::sync::Semaphore::new(PUBLISH_WINDOW)),
        };
        Self { pool, partitions, state: Arc::new(state) }
    }

    /// Publishes these orders (one message per partition) and waits for the broker to
    /// confirm them all (or for [`CONFIRM_TIMEOUT`]).
    pub async fn publish_purchases(&self, orders: &[PurchaseMessage]) -> Result<(), PublishError> {
        self.send_purchases(orders).await?.await
    }

    /// Sends these orders, one persistent message per partition holding that partition's
    /// orders in the given order, after every message sent before on this publisher, once
    /// fewer than [`PUBLISH_WINDOW`] messages await their confirm. The returned future waits
    /// for the broker's confirms (or for [`CONFIRM_TIMEOUT`]) and may be awaited elsewhere.
    pub async fn send_purchases(
        &self,
        orders: &[PurchaseMessage],
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let recently_failed = self
            .state
            .failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE);
        if recently_failed {
            return Err(PublishError::Unavailable("a recent publish failed; waiting before the next attempt".into()));
        }
        let mut by_partition: Vec<(u16, PurchaseBatch)> = Vec::new();
        for order in orders {
            let partition = partition_of(order.event_id, self.partitions);
            match by_partition.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, batch)) => batch.orders.push(order.clone()),
                None => by_partition.push((partition, PurchaseBatch { orders: vec![order.clone()] })),
            }
        }
        let mut sent = Vec::with_capacity(by_partition.len());
        for (partition, batch) in &by_partition {
            match self.send(*partition, batch).await {
                Ok(confirm) => sent.push((*partition, confirm)),
                Err(err) => {
                    metrics::counter!("turnstile_purchase_publishes_total", "outcome" => err.label()).increment(1);
                    self.state.failed().await;
                    return Err(err);
                }
            }
        }
        let state = self.state.clone();
        Ok(async move {
            let mut result = Ok(());
            for (partition, (permit, confirm)) in sent {
                let outcome = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                    Err(_) => Err(PublishError::Timeout(CONFIRM_TIMEOUT)),
                    Ok(Err(e)) => Err(PublishError::Unavailable(e.to_string())),
                    // A returned message was acked but reached no queue.
                    Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable(partition)),
                    Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                    Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
                    Ok(Ok(Confirmation::NotRequested)) => {
                        Err(PublishError::Unavailable("channel is not in confirm mode".into()))
                    }
                };
                drop(permit);
                let label = outcome.as_ref().map_or_else(PublishError::label, |()| "confirmed");
                metrics::counter!("turnstile_purchase_publishes_total", "outcome" => label).increment(1);
                if result.is_ok() {
                    result = outcome;
                }
            }
            if result.is_err() {
                state.failed().await;
            }
            result
        })
    }

    /// Sends one message, once the window has room; the permit goes back with its confirm.
    async fn send(
        &self,
        partition: u16,
        batch: &PurchaseBatch,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, lapin::PublisherConfirm), PublishError> {
        let body = serde_json::to_vec(batch).expect("a purchase message serialises");
        let first = batch.orders.first();
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(first.map(|order| order.order_id).unwrap_or_default().to_string().into());
        // The trace of the message's first order, for consumers that read only headers; each
        // order in the body carries its own.
        if let Some(traceparent) = first.and_then(|order| order.traceparent.as_deref()) {
            let mut headers = FieldTable::default();
            headers.insert(crate::telemetry::TRACEPARENT.into(), AMQPValue::LongString(traceparent.into()));
            properties = properties.with_headers(headers);
        }
        tokio::time::timeout(CONFIRM_TIMEOUT, async {
            let permit = self.state.window.clone().acquire_owned().await.expect("the window is never closed");
            let confirm = self
                .channel()
                .await?
                .basic_publish(
                    PURCHASE_EXCHANGE.into(),
                    partition.to_string().into(),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &body,
                    properties,
                )
                .await
                .map_err(|e| PublishError::Unavailable(e.to_string()))?;
            Ok((permit, confirm))
        })
        .await
        .unwrap_or(Err(PublishError::Timeout(CONFIRM_TIMEOUT)))
    }

    /// Messages ready for delivery in each partition queue (not those a consumer holds).
    pub async fn ready_messages(&self) -> Result<Vec<(u16, u32)>, PublishError> {
        let channel = self.channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let mut depths = Vec::with_capacity(usize::from(self.partitions));
        for partition in 0..self.partitions {
            let queue = channel
                .queue_declare(purchase_queue(partition).into(), passive, FieldTable::default())
                .await
                .map_err(|e| PublishError::Unavailable(e.to_string()))?;
            depths.push((partition, queue.message_count()));
        }
        Ok(depths)
    }

    /// The shared channel, opened on first use or after the previous one broke.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut slot = self.state.channel.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let unavailable = |e: &dyn std::fmt::Display| PublishError::Unavailable(e.to_string());
        let connection = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let channel = connection.create_channel().await.map_err(|e| unavailable(&e))?;
        declare_topology(&channel, self.partitions).await.map_err(|e| unavailable(&e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| unavailable(&e))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if this test fails, the hash changed and a rolling upgrade would split
    /// events across partitions. Do not update the numbers; restore the function.
    #[test]
    fn partition_hash_is_stable() {
        let cases = [
            ("00000000-0000-0000-0000-000000000000", 8, 5),
            ("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f", 8, 5),
            ("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f", 16, 13),
            ("01a20c86-f247-7730-b23d-6f1e5d19db67", 8, 0),
            ("01a20c86-f247-7730-b23d-6f1e5d19db67", 16, 8),
            ("7f3e2b10-4c5d-4e6f-8a9b-0c1d2e3f4a5b", 8, 3),
            ("7f3e2b10-4c5d-4e6f-8a9b-0c1d2e3f4a5b", 1000, 979),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 1000, 133),
        ];
        let got: Vec<u16> = cases.iter().map(|(id, n, _)| partition_of(Uuid::parse_str(id).unwrap(), *n)).collect();
        let want: Vec<u16> = cases.iter().map(|(_, _, k)| *k).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // FNV-1a 64 of the empty input is the offset basis; modulo u16::MAX + 1 exposes the
        // low bits of the full hash.
        let fnv = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
        let id = Uuid::parse_str("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f").unwrap();
        assert_eq!(u64::from(partition_of(id, 1024)), fnv(id.as_bytes()) % 1024);
    }

    #[test]
    fn partitions_spread_events() {
        let mut counts = [0u32; 8];
        for _ in 0..8000 {
            counts[usize::from(partition_of(Uuid::now_v7(), 8))] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "uneven spread: {counts:?}");
    }

    #[test]
    fn purchase_messages_are_read_in_both_forms() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let one = PurchaseMessage { order_id: a, event_id: b, traceparent: None };
        let traced = PurchaseMessage {
            order_id: b,
            event_id: b,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let batch = PurchaseBatch { orders: vec![one.clone(), traced] };
        assert_eq!(decode_purchase(&serde_json::to_vec(&batch).unwrap()).unwrap(), batch.orders);
        assert_eq!(decode_purchase(&serde_json::to_vec(&one).unwrap()).unwrap(), vec![one.clone()]);
        // What earlier versions sent, without a trace.
        let old = format!(r#"{{"orders": [{{"order_id": "{a}", "event_id": "{b}"}}]}}"#);
        assert_eq!(decode_purchase(old.as_bytes()).unwrap(), vec![one]);
        assert!(decode_purchase(b"{not json").is_err());
        assert!(decode_purchase(br#"{"order_id": 42}"#).is_err());
    }

    #[test]
    fn single_partition_takes_everything() {
        assert_eq!(partition_of(Uuid::now_v7(), 1), 0);
    }
}
