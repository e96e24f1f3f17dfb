//! Publishing with the broker's confirms: [`ConfirmChannel`], the one confirm-mode channel
//! of its holder (the api's purchase publisher, the worker's re-publisher and relay), and
//! [`Publisher`], which sends purchase messages on one.

use std::sync::Arc;
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::{
    Object, PURCHASE_EXCHANGE, Pool, PurchaseBatch, PurchaseMessage, declare_topology, partition_of, purchase_queue,
};

/// How long a publisher waits for the broker's confirm before it treats the publish as
/// failed (the order then stays with the re-publisher).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A confirm-mode channel on a pooled connection its holder keeps, opened on first use and
/// again after it broke or was [`reset`](Self::reset), with the topology declared on each
/// opening (so that what it publishes to exists). Many tasks may publish on it at once,
/// each awaiting its own confirm.
pub struct ConfirmChannel {
    pool: Pool,
    partitions: u16,
    open: tokio::sync::Mutex<Option<(Object, Channel)>>,
}

impl ConfirmChannel {
    pub fn new(pool: Pool, partitions: u16) -> Self {
        Self { pool, partitions, open: tokio::sync::Mutex::new(None) }
    }

    /// The channel, opened on first use or after the previous one broke.
    pub async fn get(&self) -> Result<Channel, PublishError> {
        let mut open = self.open.lock().await;
        if let Some((_, channel)) = open.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        // The broken channel's connection goes back to the pool, which drops it if it is lost.
        *open = None;
        let unavailable = |e: &dyn std::fmt::Display| PublishError::Unavailable(e.to_string());
        let connection = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let channel = connection.create_channel().await.map_err(|e| unavailable(&e))?;
        declare_topology(&channel, self.partitions).await.map_err(|e| unavailable(&e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| unavailable(&e))?;
        *open = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Closes the channel (after a failed publish), so that the next [`get`](Self::get)
    /// opens a fresh one.
    pub async fn reset(&self) {
        if let Some((_, channel)) = self.open.lock().await.take() {
            let _ = channel.close(200, "reset after a failed publish".into()).await;
        }
    }
}

/// Publishes purchase messages on one [`ConfirmChannel`]. Many requests publish
/// concurrently on the channel and each awaits its own confirm, which is what makes
/// confirms cheap (the round trip, not the broker, limits a serial publisher).
///
/// After a failure the publisher stays "open-circuit" for [`RETRY_AFTER_FAILURE`]: publishes
/// fail at once instead of each waiting out a timeout, so a broker outage does not slow the
/// api's answers (the orders wait for the re-publisher instead).
pub struct Publisher {
    partitions: u16,
    state: Arc<PublisherState>,
}

/// What a pending confirm needs after its publish call returned.
struct PublisherState {
    channel: ConfirmChannel,
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
        self.channel.reset().await;
    }
}

/// How long after a failed publish the next one is attempted for real.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl Publisher {
    pub fn new(pool: Pool, partitions: u16) -> Self {
        let state = PublisherState {
            channel: ConfirmChannel::new(pool, partitions),
            failed_at: std::sync::Mutex::new(None),
            window: Arc::new(tokio::sync::Semaphore::new(PUBLISH_WINDOW)),
        };
        Self { partitions, state: Arc::new(state) }
    }

    /// Opens the channel (declaring the topology) if it is not open: done at start-up, so that
    /// the first purchases do not wait for it.
    pub async fn open(&self) -> Result<(), PublishError> {
        self.state.channel.get().await.map(drop)
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

    async fn channel(&self) -> Result<Channel, PublishError> {
        self.state.channel.get().await
    }
}
