//! Stores new `QUEUED` orders for concurrent purchase requests in shared multi-row
//! `INSERT`s, then sends the stored orders to the broker as one message per partition, so a
//! stampede costs the database one statement (one commit, one history trigger) and the broker
//! one message per partition per batch instead of one per request.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::amqp::{Publisher, PurchaseMessage, partition_of};
use common::domain::{IdempotencyKey, OrderLine};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
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
    /// The promo code it was placed with (id, as the organizer wrote it).
    pub promo_code: Option<(Uuid, String)>,
    /// What the code took off the total.
    pub discount: Decimal,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The W3C trace context of the request that placed it.
    pub traceparent: Option<String>,
}

impl NewOrder {
    /// Its tickets under its promo code (those of the lines the code applies to): the uses
    /// it takes (`orders.promo_uses`).
    fn promo_uses(&self) -> i32 {
        self.lines.iter().filter(|line| line.under_promo_code()).map(|line| line.quantity).sum()
    }
}

/// What became of one [`NewOrder`].
pub enum Stored {
    /// Stored, and its message handed to the broker (or, if that failed, left to the
    /// re-publisher); its `(created_at, updated_at)`.
    Inserted(DateTime<Utc>, DateTime<Utc>),
    /// Not stored: the user already has an order under this `Idempotency-Key`.
    KeyTaken,
}

type Reply = oneshot::Sender<Result<Stored, sqlx::Error>>;

/// Hands orders to a background task that stores them in batches and publishes them. Each
/// request still learns its own outcome, and nothing is answered before its row is
/// committed and its message's send was tried: the committed row is the promise, and a
/// message that could not be sent is sent by the worker's re-publisher.
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
                outcomes.push(store_one(db, order, partitions).await);
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

/// One order of a batch whose statement failed. The failure may have come after the commit
/// (a connection lost while the server committed, a primary that crashed after writing the
/// commit): an unknown outcome, so the order is read before it is inserted again, and one
/// that the batch did store is stored.
async fn store_one(db: &PgPool, order: &NewOrder, partitions: u16) -> Result<Stored, sqlx::Error> {
    let earlier =
        sqlx::query!("SELECT created_at, updated_at FROM orders WHERE id = $1", order.id).fetch_optional(db).await?;
    if let Some(row) = earlier {
        return Ok(Stored::Inserted(row.created_at, row.updated_at));
    }
    insert_orders(db, &[order], partitions).await.map(|mut stored| outcome(&mut stored, order.id))
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
                             traceparent, lines, promo_code_id, promo_code, discount, promo_uses)
         SELECT id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition, traceparent,
                lines::json, promo_code_id, promo_code, discount, promo_uses
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::numeric[], $6::numeric[], $7::text[],
                     $8::text[], $9::int2[], $10::text[], $11::text[], $12::uuid[], $13::text[], $14::numeric[],
                     $15::int4[])
              AS u(id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                   traceparent, lines, promo_code_id, promo_code, discount, promo_uses)
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
        &lines,
        &orders.iter().map(|o| o.promo_code.as_ref().map(|(id, _)| *id)).collect::<Vec<_>>() as &[Option<Uuid>],
        &orders.iter().map(|o| o.promo_code.as_ref().map(|(_, code)| code.as_str())).collect::<Vec<_>>()
            as &[Option<&str>],
        &orders.iter().map(|o| o.discount).collect::<Vec<_>>(),
        &orders.iter().map(|o| o.promo_uses()).collect::<Vec<_>>()
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|row| (row.id, (row.created_at, row.updated_at))).collect())
}

/// An order's lines as stored (`orders.lines`).
fn lines_json(lines: &[OrderLine]) -> Result<String, sqlx::Error> {
    serde_json::to_string(lines).map_err(|err| sqlx::Error::Encode(err.into()))
}
