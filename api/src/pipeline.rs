//! The api's background helpers for the purchase pipeline:
//!
//! - [`OrderInserter`]: stores new `QUEUED` orders for concurrent purchase requests in
//!   shared multi-row `INSERT`s, then sends the stored orders to the broker as one message
//!   per partition, so a stampede costs the database one statement (one commit, one history
//!   trigger) and the broker one message per partition per batch instead of one per request.
//! - [`SoldOutHints`]: how many tickets recently read events had left, so that the
//!   sold-out fast path refuses a stampede on a sold-out event without a database read.
//! - [`OrderWatch`]: wakes long-polling `GET /orders/{id}?wait=N` requests when PostgreSQL
//!   announces (`NOTIFY order_changes`, see `listener`) that their order changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::amqp::{Publisher, PurchaseMessage, partition_of};
use common::domain::{IdempotencyKey, OrderLine};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

/// Most orders one `INSERT` (and one message per partition) carries.
const INSERT_BATCH: usize = 1_000;

/// A purchase request's order, validated and priced, to be stored `QUEUED`.
pub struct NewOrder {
    pub id: Uuid,
    pub user_id: Uuid,
    pub event_id: Uuid,
    pub quantity: i32,
    /// For an order of one line.
    pub unit_price: Option<Decimal>,
    pub total: Decimal,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The W3C trace context of the request that placed it.
    pub traceparent: Option<String>,
}

/// What became of one [`NewOrder`].
pub enum Stored {
    /// Stored, and its message sent; its `(created_at, updated_at)`.
    Inserted(DateTime<Utc>, DateTime<Utc>),
    /// Not stored: the user already has an order under this `Idempotency-Key`.
    KeyTaken,
}

type Reply = oneshot::Sender<Result<Stored, sqlx::Error>>;

/// Hands orders to a background task that stores them in batches and publishes them. Each
/// request still learns its own outcome, and nothing is answered before its row is
/// committed and its message sent.
///
/// One batch at a time: while one is stored and sent, the next gathers every request that
/// arrives, so batches grow with the load (a stampede's are hundreds of orders) and stay
/// single orders when it is quiet. One at a time also keeps the messages in the order the
/// batches were stored, so each partition receives its orders in the order they arrived.
#[derive(Clone)]
pub struct OrderInserter {
    queue: mpsc::Sender<(NewOrder, Reply)>,
}

impl OrderInserter {
    /// The inserter, and its task, which ends once every clone of the inserter is gone.
    pub fn new(
        db: PgPool,
        publisher: Arc<Publisher>,
        partitions: u16,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (queue, mut rx) = mpsc::channel::<(NewOrder, Reply)>(INSERT_BATCH * 4);
        let task = async move {
            let mut batch = Vec::with_capacity(INSERT_BATCH);
            while rx.recv_many(&mut batch, INSERT_BATCH).await > 0 {
                store(&db, &publisher, partitions, std::mem::take(&mut batch)).await;
            }
        };
        (Self { queue }, task)
    }

    /// Stores one order, sharing the statement with whatever else is waiting, and sends it.
    pub async fn insert(&self, order: NewOrder) -> Result<Stored, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((order, reply)).await.map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

/// One batch: a single `INSERT` (should it fail, every order is tried on its own, so one bad
/// row cannot fail the requests that happened to share its statement), then one message per
/// partition. The answers wait for the messages to be sent but not for the broker's
/// confirms: the stored order is the promise (the orders table is the outbox), and an order
/// whose confirm never comes is sent again by the worker's re-publisher.
async fn store(db: &PgPool, publisher: &Publisher, partitions: u16, batch: Vec<(NewOrder, Reply)>) {
    metrics::histogram!("turnstile_accept_batch_orders").record(batch.len() as f64);
    let orders: Vec<&NewOrder> = batch.iter().map(|(order, _)| order).collect();
    let outcomes: Vec<Result<Stored, sqlx::Error>> = match insert_orders(db, &orders, partitions).await {
        Ok(mut stored) => orders.iter().map(|order| Ok(outcome(&mut stored, order.id))).collect(),
        Err(err) => {
            if batch.len() > 1 {
                tracing::warn!(error = %err, orders = batch.len(), "batched order insert failed; storing one by one");
            }
            let mut outcomes = Vec::with_capacity(orders.len());
            for order in &orders {
                outcomes.push(
                    insert_orders(db, &[order], partitions).await.map(|mut stored| outcome(&mut stored, order.id)),
                );
            }
            outcomes
        }
    };
    let sent: Vec<PurchaseMessage> = orders
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| matches!(outcome, Ok(Stored::Inserted(..))))
        .map(|(order, _)| PurchaseMessage {
            order_id: order.id,
            event_id: order.event_id,
            traceparent: order.traceparent.clone(),
        })
        .collect();
    if !sent.is_empty() {
        let not_confirmed = move |orders: usize, err: common::amqp::PublishError| {
            tracing::warn!(orders, error = %err, "purchase messages not confirmed; the re-publisher will send them");
        };
        match publisher.send_purchases(&sent).await {
            Ok(confirmed) => {
                let count = sent.len();
                tokio::spawn(async move {
                    if let Err(err) = confirmed.await {
                        not_confirmed(count, err);
                    }
                });
            }
            Err(err) => not_confirmed(sent.len(), err),
        }
    }
    for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

fn outcome(stored: &mut HashMap<Uuid, (DateTime<Utc>, DateTime<Utc>)>, id: Uuid) -> Stored {
    stored.remove(&id).map_or(Stored::KeyTaken, |(created, updated)| Stored::Inserted(created, updated))
}

/// Inserts the orders in one statement; returns the timestamps of those stored. An order
/// whose `Idempotency-Key` the user already used (even earlier in the same batch) is skipped.
async fn insert_orders(
    db: &PgPool,
    orders: &[&NewOrder],
    partitions: u16,
) -> Result<HashMap<Uuid, (DateTime<Utc>, DateTime<Utc>)>, sqlx::Error> {
    let column = |f: fn(&NewOrder) -> Uuid| orders.iter().map(|o| f(o)).collect::<Vec<_>>();
    let partition = |o: &&NewOrder| partition_of(o.event_id, partitions) as i16;
    let lines = orders.iter().map(|o| lines_json(&o.lines)).collect::<Result<Vec<_>, _>>()?;
    let rows = sqlx::query!(
        "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                             traceparent, lines)
         SELECT id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition, traceparent,
                lines::json
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::numeric[], $6::numeric[], $7::text[],
                     $8::text[], $9::int2[], $10::text[], $11::text[])
              AS u(id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                   traceparent, lines)
         ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id, created_at, updated_at",
        &column(|o| o.id),
        &column(|o| o.user_id),
        &column(|o| o.event_id),
        &orders.iter().map(|o| o.quantity).collect::<Vec<_>>(),
        &orders.iter().map(|o| o.unit_price).collect::<Vec<_>>() as &[Option<Decimal>],
        &orders.iter().map(|o| o.total).collect::<Vec<_>>(),
        &orders.iter().map(|o| o.currency.as_str()).collect::<Vec<_>>() as &[&str],
        &orders.iter().map(|o| o.idempotency_key.as_ref().map(IdempotencyKey::as_str)).collect::<Vec<_>>()
            as &[Option<&str>],
        &orders.iter().map(partition).collect::<Vec<_>>(),
        &orders.iter().map(|o| o.traceparent.as_deref()).collect::<Vec<_>>() as &[Option<&str>],
        &lines
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|row| (row.id, (row.created_at, row.updated_at))).collect())
}

/// An order's lines as stored (`orders.lines`).
fn lines_json(lines: &[OrderLine]) -> Result<String, sqlx::Error> {
    serde_json::to_string(lines).map_err(|err| sqlx::Error::Encode(err.into()))
}

/// Tickets left per event as last read from the database, trusted for a short time. A
/// hint, never the authority: it may only refuse (`409 sold_out`) what the database very
/// recently said could not be sold; everything else is read afresh and decided by the worker.
pub struct SoldOutHints {
    ttl: Duration,
    seen: Mutex<HashMap<Uuid, Hint>>,
}

#[derive(Clone, Copy)]
pub struct Hint {
    pub available: i32,
    read_at: Instant,
}

/// Above this many remembered events, stale hints are dropped.
const HINTS_KEPT: usize = 10_000;

impl SoldOutHints {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, seen: Mutex::default() }
    }

    /// The event's hint, if it was read within the time to trust it.
    pub fn get(&self, event_id: Uuid) -> Option<Hint> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&event_id).copied().filter(|hint| hint.read_at.elapsed() < self.ttl)
    }

    pub fn record(&self, event_id: Uuid, available: i32) {
        if self.ttl.is_zero() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= HINTS_KEPT {
            seen.retain(|_, hint| hint.read_at.elapsed() < self.ttl);
        }
        seen.insert(event_id, Hint { available, read_at: Instant::now() });
    }
}

/// Long-poll waiters by order id.
#[derive(Default)]
pub struct OrderWatch {
    waiters: Mutex<HashMap<Uuid, Arc<Notify>>>,
}

/// One request's interest in one order; unregisters itself when dropped.
pub struct Waiter {
    watch: Arc<OrderWatch>,
    order_id: Uuid,
    notify: Arc<Notify>,
}

impl Waiter {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.watch.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // The map holds one reference and this waiter another: no one else is waiting.
        if Arc::strong_count(&self.notify) <= 2 {
            waiters.remove(&self.order_id);
        }
    }
}

impl OrderWatch {
    pub fn watch(self: &Arc<Self>, order_id: Uuid) -> Waiter {
        let notify = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).entry(order_id).or_default().clone();
        Waiter { watch: self.clone(), order_id, notify }
    }

    pub fn wake(&self, order_id: Uuid) {
        if let Some(notify) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).get(&order_id) {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_waiters_of_that_order_only() {
        let watch = Arc::new(OrderWatch::default());
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let waiter = watch.watch(a);
        let other = watch.watch(b);
        let notified = waiter.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let unrelated = other.notify().notified();
        tokio::pin!(unrelated);
        unrelated.as_mut().enable();
        watch.wake(a);
        tokio::time::timeout(Duration::from_millis(100), notified).await.expect("waiter woken");
        assert!(tokio::time::timeout(Duration::from_millis(50), unrelated).await.is_err());
    }

    #[test]
    fn hints_are_trusted_for_their_time_only() {
        let event = Uuid::from_u128(7);
        let hints = SoldOutHints::new(Duration::from_millis(50));
        assert!(hints.get(event).is_none());
        hints.record(event, 0);
        assert_eq!(hints.get(event).map(|h| h.available), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert!(hints.get(event).is_none(), "stale");
        let off = SoldOutHints::new(Duration::ZERO);
        off.record(event, 0);
        assert!(off.get(event).is_none(), "a zero time keeps nothing");
    }

    #[test]
    fn dropped_waiters_unregister() {
        let watch = Arc::new(OrderWatch::default());
        let id = Uuid::from_u128(1);
        let first = watch.watch(id);
        let second = watch.watch(id);
        drop(first);
        assert_eq!(watch.waiters.lock().unwrap().len(), 1, "second still waits");
        drop(second);
        assert!(watch.waiters.lock().unwrap().is_empty());
    }
}
