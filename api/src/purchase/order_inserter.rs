//! Stores new `QUEUED` orders for concurrent purchase requests in shared multi-row
//! `INSERT`s, then sends the stored orders to the broker as one message per partition, so a
//! stampede costs the database one statement (one commit) per batch and the broker one
//! message per partition per sending, instead of one of each per request. Each order row is
//! also its own `QUEUED` change (`queued_event_id`, see migration 0022): no history row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::amqp::{Publisher, PurchaseMessage, partition_of};
use common::domain::{IdempotencyKey, OrderLine};
use rust_decimal::Decimal;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};
use uuid::Uuid;

/// Most orders one `INSERT` (and one message per partition) carries.
const INSERT_BATCH: usize = 1_000;
/// Stored batches waiting for the sender; beyond that, storing waits (the broker is slow).
const STORED_WAITING: usize = 64;

/// A purchase request's order, validated and priced, to be stored `QUEUED`.
#[derive(Clone)]
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
    /// Placed in its event's pre-sale window: stored as an entry of the pre-sale queue while
    /// the event's draw is pending (numbered, like any order, once it has happened).
    pub presale_entry: bool,
}

impl NewOrder {
    /// Its tickets under its promo code (those of the lines the code applies to): the uses
    /// it takes (`orders.promo_uses`).
    fn promo_uses(&self) -> i32 {
        self.lines.iter().filter(|line| line.under_promo_code()).map(|line| line.quantity).sum()
    }
}

/// How orders are stored.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The broker's partition queues.
    pub partitions: u16,
    /// `QUEUE_DEMAND_FACTOR` (0: no queue-full refusals, unless an event sets its own).
    pub demand_factor: f64,
    /// `ORDER_INSERT_INTERVAL_MS`: the least time from one batch's start to the next's.
    pub insert_interval: Duration,
    /// `PURCHASE_SEND_INTERVAL_MS`: the least time from one sending to the next.
    pub send_interval: Duration,
    /// `PURCHASE_MESSAGE_ORDERS`: the orders that fill a partition's message.
    pub message_orders: usize,
    /// `PURCHASE_SEND_MAX_WAIT_MS`: the longest a partition's orders wait to fill a message,
    /// from its last message.
    pub send_max_wait: Duration,
}

impl Settings {
    pub fn of(config: &common::config::ApiConfig) -> Self {
        Self {
            partitions: config.broker.partitions,
            demand_factor: config.queue_demand_factor,
            insert_interval: Duration::from_millis(config.order_insert_interval_ms),
            send_interval: Duration::from_millis(config.purchase_send_interval_ms),
            message_orders: usize::try_from(config.purchase_message_orders).unwrap_or(usize::MAX),
            send_max_wait: Duration::from_millis(config.purchase_send_max_wait_ms),
        }
    }

    /// The deployment's queue-full factor as the statements take it (`NULL`: none).
    fn factor(self) -> Option<f64> {
        (self.demand_factor > 0.0).then_some(self.demand_factor)
    }
}

/// What became of one [`NewOrder`].
pub enum Stored {
    /// Stored, and its message handed to the broker (or, if that failed, left to the
    /// re-publisher).
    Inserted(Placed),
    /// Not stored: the user already has an order under this `Idempotency-Key`.
    KeyTaken,
    /// Not stored: the event's queue asks for too many tickets already (queue full). What
    /// its queued orders ask for, and what the event has left.
    QueueFull { queued: i64, left: i64 },
    /// Not stored: the event's pre-sale draw has not happened, and this order is not an
    /// entry (it arrived after the opening): the draw is to be run, then the order stored.
    DrawPending,
    /// Not stored: a pre-sale entry whose buyer already has an open entry for the event (or,
    /// with a concurrent request, whose `Idempotency-Key` was just taken).
    EntryTaken,
}

type Reply = oneshot::Sender<Result<Stored, sqlx::Error>>;

/// Hands orders to a background task that stores them in batches and publishes them. Each
/// request still learns its own outcome, and nothing is answered before its row is
/// committed: the committed row is the promise, and a message that was not sent (the broker
/// down, the process stopped first) is sent by the worker's re-publisher.
///
/// One batch at a time, at most one per `ORDER_INSERT_INTERVAL_MS`: while one is stored,
/// the next gathers every request that arrives, so batches grow with the load (a
/// stampede's are hundreds of orders), a steady trickle shares statements, and a lone order
/// is stored at once. One sender, fed in the order the batches were stored, keeps each
/// partition's messages in the order its orders arrived.
#[derive(Clone)]
pub struct OrderInserter {
    queue: mpsc::Sender<(NewOrder, Reply)>,
}

impl OrderInserter {
    /// The inserter, and its task, which ends once every clone of the inserter is gone (and
    /// every stored order's message was sent). `connection`: the one to keep, [`warm`]ed.
    pub fn new(
        db: PgPool,
        connection: PoolConnection<Postgres>,
        publisher: Arc<Publisher>,
        settings: Settings,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (queue, mut rx) = mpsc::channel::<(NewOrder, Reply)>(INSERT_BATCH * 4);
        let (stored, to_send) = mpsc::channel::<Vec<PurchaseMessage>>(STORED_WAITING);
        let storing = async move {
            let mut held = Held { db, connection: Some(connection) };
            let mut batch = Vec::with_capacity(INSERT_BATCH);
            while rx.recv_many(&mut batch, INSERT_BATCH).await > 0 {
                let started = Instant::now();
                let sent = store(&mut held, settings, std::mem::take(&mut batch)).await;
                if !sent.is_empty() && stored.send(sent).await.is_err() {
                    tracing::warn!("the purchase sender stopped; the re-publisher will send the orders");
                }
                tokio::time::sleep_until(started + settings.insert_interval).await;
            }
        };
        let task = async move {
            tokio::join!(storing, send_stored(publisher, to_send, settings));
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

/// The inserter's connection, kept from batch to batch: one task runs one statement at a
/// time, so taking a connection from the pool for each batch would only add sqlx's check
/// that the server is still a primary (a round trip per batch) and spread the statements'
/// planning over every connection. After an error it goes back to the pool, and the next
/// batch takes one that passed that check.
struct Held {
    db: PgPool,
    connection: Option<PoolConnection<Postgres>>,
}

impl Held {
    /// Stores the batch on the held connection ([`insert_orders`]).
    async fn insert(&mut self, orders: &[&NewOrder], settings: Settings) -> Result<HashMap<Uuid, Stored>, sqlx::Error> {
        if self.connection.is_none() {
            self.connection = Some(self.db.acquire().await?);
        }
        let conn = self.connection.as_deref_mut().ok_or(sqlx::Error::PoolClosed)?;
        let result = insert_orders(conn, orders, settings).await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }
}

/// Runs both insert statements on an empty batch (no effect) on this connection, so that a
/// new server process has read the catalogue entries they need and the connection has them
/// prepared before the first order comes.
pub async fn warm(conn: &mut sqlx::PgConnection, settings: Settings) -> Result<(), sqlx::Error> {
    insert_numbered(&mut *conn, &[], settings).await?;
    insert_judged(&mut *conn, &[], settings).await?;
    Ok(())
}

/// One batch: a single `INSERT` (should it fail, every order is tried on its own, so one bad
/// row cannot fail the requests that happened to share its statement); each request is
/// answered once it is committed. Returns the messages of the orders stored, to be sent: the
/// answers do not wait for them, for the stored order is the promise (the orders table is
/// the outbox), and an order whose message never reaches a queue is sent again by the
/// worker's re-publisher.
async fn store(held: &mut Held, settings: Settings, batch: Vec<(NewOrder, Reply)>) -> Vec<PurchaseMessage> {
    let started = Instant::now();
    metrics::histogram!("turnstile_accept_batch_orders").record(batch.len() as f64);
    let orders: Vec<&NewOrder> = batch.iter().map(|(order, _)| order).collect();
    let outcomes: Vec<Result<Stored, sqlx::Error>> = match held.insert(&orders, settings).await {
        Ok(mut stored) => orders.iter().map(|order| Ok(outcome(&mut stored, order.id))).collect(),
        Err(err) => {
            if batch.len() > 1 {
                tracing::warn!(error = %err, orders = batch.len(), "batched order insert failed; storing one by one");
            }
            let mut outcomes = Vec::with_capacity(orders.len());
            for order in &orders {
                outcomes.push(store_one(&held.db, order, settings).await);
            }
            outcomes
        }
    };
    let sent: Vec<PurchaseMessage> = orders
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| matches!(outcome, Ok(Stored::Inserted(placed)) if !placed.presale_entry))
        .map(|(order, _)| PurchaseMessage {
            order_id: order.id,
            event_id: order.event_id,
            traceparent: order.traceparent.clone(),
        })
        .collect();
    for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
    metrics::histogram!("turnstile_accept_batch_duration_seconds").record(started.elapsed().as_secs_f64());
    sent
}

/// Sends the stored orders' messages, each partition's in the order they were stored, at
/// most once per `PURCHASE_SEND_INTERVAL_MS`: a sending takes the partitions whose orders fill
/// a message (`PURCHASE_MESSAGE_ORDERS`) or whose last message went `PURCHASE_SEND_MAX_WAIT_MS`
/// ago, one message each (of at most [`INSERT_BATCH`] orders). So orders arriving one by one
/// cost the broker a message per interval, not one each, and orders spread over many events
/// (so over every partition) fill messages of several orders instead of one or two (see
/// [`Unsent`] for when a partition that waits is sent). Whatever waits is sent when the api
/// stops. Waits for the sending (and, beyond the publisher's window, for confirms) but not
/// for each confirm.
async fn send_stored(publisher: Arc<Publisher>, mut stored: mpsc::Receiver<Vec<PurchaseMessage>>, settings: Settings) {
    let mut unsent = Unsent::new(settings);
    let mut batches = Vec::new();
    loop {
        let due = unsent.next_due(Instant::now());
        let open = tokio::select! {
            received = stored.recv_many(&mut batches, STORED_WAITING) => received > 0,
            () = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if !open {
            break;
        }
        if let Some(last) = unsent.last_sending() {
            tokio::time::sleep_until(last + settings.send_interval).await;
        }
        while let Ok(more) = stored.try_recv() {
            batches.push(more);
        }
        batches.drain(..).for_each(|batch| unsent.add(batch));
        for chunk in unsent.take_due(Instant::now()).chunks(INSERT_BATCH) {
            send(&publisher, chunk).await;
        }
    }
    for chunk in unsent.take_all().chunks(INSERT_BATCH) {
        send(&publisher, chunk).await;
    }
}

/// The stored orders not sent yet, by partition, and when each partition's last message went.
///
/// A partition whose orders do not fill a message sends them at the first point after its
/// last message on a grid of `PURCHASE_SEND_MAX_WAIT_MS` steps from the first sending,
/// common to every partition: at most that long after its last message, and at the same
/// time as the other partitions that wait, so that the worker gets their messages together
/// and decides them in one transaction rather than one each. A partition that has not sent
/// anything yet, or quiet for a whole step, is due at once.
struct Unsent {
    settings: Settings,
    /// The grid's origin: the first sending.
    origin: Option<Instant>,
    orders: Vec<Vec<PurchaseMessage>>,
    last_sent: Vec<Option<Instant>>,
}

impl Unsent {
    /// Nothing waiting, and every partition quiet (its next order goes at once).
    fn new(settings: Settings) -> Self {
        let partitions = usize::from(settings.partitions.max(1));
        Self { settings, origin: None, orders: vec![Vec::new(); partitions], last_sent: vec![None; partitions] }
    }

    fn add(&mut self, orders: Vec<PurchaseMessage>) {
        for order in orders {
            let partition = usize::from(partition_of(order.event_id, self.settings.partitions));
            self.orders[partition].push(order);
        }
    }

    /// When this partition's waiting orders are to be sent (`None`: none wait).
    fn due_at(&self, partition: usize, now: Instant) -> Option<Instant> {
        let waiting = self.orders[partition].len();
        let step = self.settings.send_max_wait;
        if waiting == 0 {
            return None;
        }
        let (Some(last), Some(origin)) = (self.last_sent[partition], self.origin) else { return Some(now) };
        if waiting >= self.settings.message_orders || step.is_zero() {
            return Some(now);
        }
        // The first point of the grid after `last`.
        let step = step.as_nanos();
        let next = (last.saturating_duration_since(origin).as_nanos() / step + 1) * step;
        Some(origin + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX)))
    }

    /// When the last sending was.
    fn last_sending(&self) -> Option<Instant> {
        self.last_sent.iter().flatten().max().copied()
    }

    /// When the first partition is due.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        (0..self.orders.len()).filter_map(|partition| self.due_at(partition, now)).min()
    }

    /// The orders of every partition due by `now`, each partition's in stored order.
    fn take_due(&mut self, now: Instant) -> Vec<PurchaseMessage> {
        let mut due = Vec::new();
        for partition in 0..self.orders.len() {
            if self.due_at(partition, now).is_some_and(|at| at <= now) {
                due.append(&mut self.orders[partition]);
                self.last_sent[partition] = Some(now);
            }
        }
        if !due.is_empty() {
            self.origin.get_or_insert(now);
        }
        due
    }

    fn take_all(&mut self) -> Vec<PurchaseMessage> {
        self.orders.iter_mut().flat_map(std::mem::take).collect()
    }
}

/// Sends these orders; a failure, or a confirm that does not come, is logged and left to the
/// re-publisher.
async fn send(publisher: &Publisher, orders: &[PurchaseMessage]) {
    let not_confirmed = move |orders: usize, err: common::amqp::PublishError| {
        tracing::warn!(orders, error = %err, "purchase messages not confirmed; the re-publisher will send them");
    };
    match publisher.send_purchases(orders).await {
        Ok(confirmed) => {
            let count = orders.len();
            tokio::spawn(async move {
                if let Err(err) = confirmed.await {
                    not_confirmed(count, err);
                }
            });
        }
        Err(err) => not_confirmed(orders.len(), err),
    }
}

/// One order of a batch whose statement failed. The failure may have come after the commit
/// (a connection lost while the server committed, a primary that crashed after writing the
/// commit): an unknown outcome, so the order is read before it is inserted again, and one
/// that the batch did store is stored.
async fn store_one(db: &PgPool, order: &NewOrder, settings: Settings) -> Result<Stored, sqlx::Error> {
    let earlier = sqlx::query!(
        r#"SELECT o.created_at, o.updated_at, o.queue_number, o.presale_entry AND o.queue_number IS NULL AS "entry!",
                  queue_position(o.status, o.queue_number, e.queue_decided) AS queue_position,
                  queue_wait_secs(o.status, o.queue_number, e.queue_decided, e.queue_rate) AS estimated_wait_secs
           FROM orders o JOIN events e ON e.id = o.event_id WHERE o.id = $1"#,
        order.id
    )
    .fetch_optional(db)
    .await?;
    if let Some(row) = earlier {
        return Ok(Stored::Inserted(Placed {
            created_at: row.created_at,
            updated_at: row.updated_at,
            queue_number: row.queue_number,
            queue_position: row.queue_position,
            estimated_wait_secs: row.estimated_wait_secs,
            presale_entry: row.entry,
        }));
    }
    let mut conn = db.acquire().await?;
    insert_orders(&mut conn, &[order], settings).await.map(|mut stored| outcome(&mut stored, order.id))
}

/// One order's outcome; an order the statement did not look at had a key its user had used.
fn outcome(stored: &mut HashMap<Uuid, Stored>, id: Uuid) -> Stored {
    stored.remove(&id).unwrap_or(Stored::KeyTaken)
}

/// An order as its insert statement stored it.
#[derive(Clone, Copy, Debug)]
pub struct Placed {
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Its number in its event's queue.
    pub queue_number: Option<i64>,
    /// Its place in line when it was stored (1: the next of its event to be decided).
    pub queue_position: Option<i64>,
    /// Seconds until it is decided, at its event's recent rate; `None` while unknown.
    pub estimated_wait_secs: Option<i64>,
    /// Stored as a pre-sale entry: no number and no message until the draw.
    pub presale_entry: bool,
}

/// Stores the orders, each numbered in its event's queue in the order given; returns what
/// became of each. Most batches take one statement, [`insert_numbered`]; the orders it leaves
/// out (an event whose draw is pending, or whose queue the batch would fill) are judged one
/// by one by [`insert_judged`]. Should an order's `Idempotency-Key` turn out to be taken (a
/// concurrent request with the same key: the route looks for the key first), the first
/// statement fails as a whole and the second judges the whole batch.
async fn insert_orders(
    conn: &mut sqlx::PgConnection,
    orders: &[&NewOrder],
    settings: Settings,
) -> Result<HashMap<Uuid, Stored>, sqlx::Error> {
    let mut stored = match insert_numbered(&mut *conn, orders, settings).await {
        Ok(stored) => stored,
        Err(sqlx::Error::Database(err)) if err.is_unique_violation() => HashMap::new(),
        Err(err) => return Err(err),
    };
    let rest: Vec<&NewOrder> = orders.iter().filter(|order| !stored.contains_key(&order.id)).copied().collect();
    if !rest.is_empty() {
        stored.extend(insert_judged(&mut *conn, &rest, settings).await?);
    }
    Ok(stored)
}

/// The common case in one statement: for each event of the batch whose draw is not pending
/// and whose queue the batch's orders keep within queue full, raises the queue's last number
/// and tickets by the batch's, and inserts that event's orders numbered after the last
/// number it had. The `UPDATE` takes the queue rows' locks as its plan walks `n`, which is
/// sorted by event, so two api processes take them in one order (should a plan ever
/// deadlock, PostgreSQL fails one statement and its orders are stored one by one), and one
/// that waited judges queue full on the row's newest version. The orders of the other
/// events are left out, for [`insert_judged`]. A taken key fails the statement (no `ON
/// CONFLICT`): what it raised would otherwise count orders that were not stored.
///
/// (Looking each event up by its key with a lateral subquery, so that no plan reads all of
/// `events`, stored a batch over 1,000 events in 0.31 ms instead of 0.47, but cost one event's
/// steady rate 18 µs of PostgreSQL per order: it is not in.)
async fn insert_numbered(
    db: impl sqlx::PgExecutor<'_>,
    orders: &[&NewOrder],
    settings: Settings,
) -> Result<HashMap<Uuid, Stored>, sqlx::Error> {
    let c = Columns::of(orders, settings.partitions)?;
    let queues = Queues::of(orders);
    let rows = sqlx::query!(
        r#"WITH n AS (
             SELECT * FROM UNNEST($17::uuid[], $18::int8[], $19::int8[]) AS n(event_id, orders, tickets)
         ),
         q AS (
             UPDATE event_queues q SET issued = q.issued + n.orders, tickets = q.tickets + n.tickets
             FROM n JOIN events e ON e.id = n.event_id
             WHERE q.event_id = n.event_id AND NOT q.draw_pending
               AND (coalesce(e.queue_demand_factor, $20) IS NULL OR e.capacity <= e.sold
                    OR greatest(q.tickets - e.queue_tickets_decided, 0) + n.tickets
                       <= coalesce(e.queue_demand_factor, $20) * (e.capacity - e.sold))
             RETURNING q.event_id, q.issued - n.orders AS base, e.queue_decided, e.queue_rate
         ),
         stored AS (
             INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key,
                                 partition, traceparent, lines, promo_code_id, promo_code, discount, promo_uses,
                                 queue_number, queued_xid, queued_event_id)
             SELECT u.id, u.user_id, u.event_id, u.quantity, u.unit_price, u.total, u.currency, u.idempotency_key,
                    u.partition, u.traceparent, u.lines::json, u.promo_code_id, u.promo_code, u.discount,
                    u.promo_uses, q.base + u.rank, pg_current_xact_id(), nextval('order_history_id_seq')
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::numeric[], $6::numeric[],
                         $7::text[], $8::text[], $9::int2[], $10::text[], $11::text[], $12::uuid[],
                         $13::text[], $14::numeric[], $15::int4[], $16::int8[])
                  AS u(id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                       traceparent, lines, promo_code_id, promo_code, discount, promo_uses, rank)
             JOIN q ON q.event_id = u.event_id
             RETURNING id, event_id, created_at, updated_at, queue_number
         )
         SELECT s.id, s.created_at, s.updated_at, s.queue_number,
                queue_position('QUEUED', s.queue_number, q.queue_decided) AS queue_position,
                queue_wait_secs('QUEUED', s.queue_number, q.queue_decided, q.queue_rate) AS estimated_wait_secs
         FROM stored s JOIN q ON q.event_id = s.event_id"#,
        &c.ids,
        &c.user_ids,
        &c.event_ids,
        &c.quantities,
        &c.unit_prices as &[Option<Decimal>],
        &c.totals,
        &c.currencies as &[&str],
        &c.keys as &[Option<&str>],
        &c.partitions,
        &c.traceparents as &[Option<&str>],
        &c.lines,
        &c.code_ids as &[Option<Uuid>],
        &c.codes as &[Option<&str>],
        &c.discounts,
        &c.promo_uses,
        &queues.ranks,
        &queues.events,
        &queues.orders,
        &queues.tickets,
        settings.factor()
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let placed = Placed {
                created_at: row.created_at,
                updated_at: row.updated_at,
                queue_number: row.queue_number,
                queue_position: row.queue_position,
                estimated_wait_secs: row.estimated_wait_secs,
                presale_entry: false,
            };
            (row.id, Stored::Inserted(placed))
        })
        .collect())
}

/// Stores the orders in one statement that judges each on its own, numbered in its event's
/// queue in the order given; returns what became of each. The statement:
///
/// - `given`: leaves out an order whose `Idempotency-Key` its user already used: it is
///   answered as a replay (as is one whose key an order earlier in the batch took, skipped
///   on insert);
/// - `queues`: locks the rows of the batch's events in `event_queues` (in event order, so two
///   statements never wait for each other in a cycle) until it commits, so the counting and
///   the refusals below are exact under concurrency;
/// - `judged`: queue full, refuses an order that would make its event's queue ask for
///   more than `factor` times what is left (`QUEUE_DEMAND_FACTOR`, 0 for none, unless the
///   event has its own); never while nothing is left, which is the sold-out answers' case;
/// - `judged`, pre-sale: while the event's draw is pending, only entries are stored, and
///   without a number (the draw numbers them); an order that is not an entry waits for the
///   draw ([`Stored::DrawPending`]);
/// - `stored`, `counted`: inserts the others, numbered after the last number given, and
///   raises the queue's last number and tickets by what was numbered. Any unique index
///   skips an order: a used key, or a buyer's second open entry.
///
/// Should a key be taken between the check and the insert (earlier in the batch, or by a
/// concurrent statement), that order's number is left unused: places are counted from the worker's highest decided number, so
/// the gap closes once the worker passes it.
async fn insert_judged(
    db: impl sqlx::PgExecutor<'_>,
    orders: &[&NewOrder],
    settings: Settings,
) -> Result<HashMap<Uuid, Stored>, sqlx::Error> {
    let c = Columns::of(orders, settings.partitions)?;
    let rows = sqlx::query_as!(
        Row,
        r#"WITH given AS (
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::numeric[], $6::numeric[],
                                  $7::text[], $8::text[], $9::int2[], $10::text[], $11::text[], $12::uuid[],
                                  $13::text[], $14::numeric[], $15::int4[], $16::bool[]) WITH ORDINALITY
                  AS g(id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                       traceparent, lines, promo_code_id, promo_code, discount, promo_uses, entry, arrival)
             WHERE g.idempotency_key IS NULL
                OR NOT EXISTS (SELECT FROM orders o WHERE o.user_id = g.user_id AND o.idempotency_key = g.idempotency_key)
         ),
         queues AS MATERIALIZED (
             SELECT q.* FROM event_queues q WHERE q.event_id IN (SELECT event_id FROM given)
             ORDER BY q.event_id FOR NO KEY UPDATE
         ),
         judged AS (
             SELECT g.*, q.issued, q.draw_pending, e.queue_decided, e.queue_rate, (e.capacity - e.sold)::int8 AS left_,
                    greatest(q.tickets - e.queue_tickets_decided, 0) AS queued,
                    CASE WHEN q.draw_pending THEN g.entry
                         ELSE coalesce(e.queue_demand_factor, $17) IS NULL OR e.capacity <= e.sold
                              OR greatest(q.tickets - e.queue_tickets_decided, 0) + sum(g.quantity) OVER w
                                 <= coalesce(e.queue_demand_factor, $17) * (e.capacity - e.sold) END AS ok
             FROM given g JOIN queues q USING (event_id) JOIN events e ON e.id = g.event_id
             WINDOW w AS (PARTITION BY g.event_id ORDER BY g.arrival)
         ),
         stored AS (
             INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key,
                                 partition, traceparent, lines, promo_code_id, promo_code, discount, promo_uses,
                                 queue_number, presale_entry, queued_xid, queued_event_id)
             SELECT id, user_id, event_id, quantity, unit_price, total, currency, idempotency_key, partition,
                    traceparent, lines::json, promo_code_id, promo_code, discount, promo_uses,
                    CASE WHEN NOT draw_pending THEN issued + row_number() OVER (PARTITION BY event_id ORDER BY arrival) END,
                    draw_pending, pg_current_xact_id(), nextval('order_history_id_seq')
             FROM judged WHERE ok ORDER BY arrival
             ON CONFLICT DO NOTHING
             RETURNING id, event_id, quantity, created_at, updated_at, queue_number
         ),
         counted AS (
             UPDATE event_queues q SET issued = greatest(q.issued, c.last), tickets = q.tickets + c.tickets
             FROM (SELECT event_id, max(queue_number) AS last, sum(quantity) AS tickets
                   FROM stored WHERE queue_number IS NOT NULL GROUP BY event_id) c
             WHERE q.event_id = c.event_id
         )
         SELECT j.id AS "id!", s.created_at AS "created_at?", s.updated_at AS "updated_at?", s.queue_number,
                queue_position('QUEUED', s.queue_number, j.queue_decided) AS queue_position,
                queue_wait_secs('QUEUED', s.queue_number, j.queue_decided, j.queue_rate) AS estimated_wait_secs,
                j.queued + coalesce(sum(j.quantity) FILTER (WHERE j.ok AND NOT j.draw_pending)
                                        OVER (PARTITION BY j.event_id), 0) AS "queued!",
                j.left_ AS "left!", j.ok AS "admitted!", j.draw_pending AS "draw_pending!", j.entry AS "entry!"
         FROM judged j LEFT JOIN stored s ON s.id = j.id"#,
        &c.ids,
        &c.user_ids,
        &c.event_ids,
        &c.quantities,
        &c.unit_prices as &[Option<Decimal>],
        &c.totals,
        &c.currencies as &[&str],
        &c.keys as &[Option<&str>],
        &c.partitions,
        &c.traceparents as &[Option<&str>],
        &c.lines,
        &c.code_ids as &[Option<Uuid>],
        &c.codes as &[Option<&str>],
        &c.discounts,
        &c.promo_uses,
        &c.entries,
        settings.factor()
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Row::outcome).collect())
}

/// A batch of orders as the insert statements take them: an array per column.
struct Columns<'a> {
    ids: Vec<Uuid>,
    user_ids: Vec<Uuid>,
    event_ids: Vec<Uuid>,
    quantities: Vec<i32>,
    unit_prices: Vec<Option<Decimal>>,
    totals: Vec<Decimal>,
    currencies: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    partitions: Vec<i16>,
    traceparents: Vec<Option<&'a str>>,
    lines: Vec<String>,
    code_ids: Vec<Option<Uuid>>,
    codes: Vec<Option<&'a str>>,
    discounts: Vec<Decimal>,
    promo_uses: Vec<i32>,
    entries: Vec<bool>,
}

impl<'a> Columns<'a> {
    fn of(orders: &[&'a NewOrder], partitions: u16) -> Result<Self, sqlx::Error> {
        fn each<'a, T>(orders: &[&'a NewOrder], f: impl Fn(&'a NewOrder) -> T) -> Vec<T> {
            orders.iter().map(|o| f(o)).collect()
        }
        Ok(Self {
            ids: each(orders, |o| o.id),
            user_ids: each(orders, |o| o.user_id),
            event_ids: each(orders, |o| o.event_id),
            quantities: each(orders, |o| o.quantity),
            unit_prices: each(orders, |o| o.unit_price),
            totals: each(orders, |o| o.total),
            currencies: each(orders, |o| o.currency.as_str()),
            keys: each(orders, |o| o.idempotency_key.as_ref().map(IdempotencyKey::as_str)),
            partitions: each(orders, |o| partition_of(o.event_id, partitions) as i16),
            traceparents: each(orders, |o| o.traceparent.as_deref()),
            lines: orders.iter().map(|o| lines_json(&o.lines)).collect::<Result<_, _>>()?,
            code_ids: each(orders, |o| o.promo_code.as_ref().map(|(id, _)| *id)),
            codes: each(orders, |o| o.promo_code.as_ref().map(|(_, code)| code.as_str())),
            discounts: each(orders, |o| o.discount),
            promo_uses: each(orders, NewOrder::promo_uses),
            entries: each(orders, |o| o.presale_entry),
        })
    }
}

/// A batch's orders per event, as [`insert_numbered`] takes them: each order's rank among its
/// event's orders in the batch (1 for the first), and each event's orders and tickets, in
/// event order (the order in which the statement locks the queue rows).
struct Queues {
    ranks: Vec<i64>,
    events: Vec<Uuid>,
    orders: Vec<i64>,
    tickets: Vec<i64>,
}

impl Queues {
    fn of(orders: &[&NewOrder]) -> Self {
        let mut per_event: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
        let ranks = orders
            .iter()
            .map(|order| {
                let (count, tickets) = per_event.entry(order.event_id).or_default();
                *count += 1;
                *tickets += i64::from(order.quantity);
                *count
            })
            .collect();
        let mut queues = Self { ranks, events: Vec::new(), orders: Vec::new(), tickets: Vec::new() };
        for (event, (count, tickets)) in per_event {
            queues.events.push(event);
            queues.orders.push(count);
            queues.tickets.push(tickets);
        }
        queues
    }
}

/// One order as [`insert_judged`]'s statement answers for it.
struct Row {
    id: Uuid,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    queue_number: Option<i64>,
    queue_position: Option<i64>,
    estimated_wait_secs: Option<i64>,
    /// What its event's queued orders ask for after the statement, and what it has left.
    queued: i64,
    left: i64,
    /// Passed queue full, or a pre-sale entry while the draw is pending (stored unless its
    /// key, or its buyer's entry, was taken meanwhile).
    admitted: bool,
    /// Its event's draw is pending.
    draw_pending: bool,
    /// Placed as a pre-sale entry.
    entry: bool,
}

impl Row {
    fn outcome(self) -> (Uuid, Stored) {
        let stored = match (self.created_at, self.updated_at) {
            (Some(created_at), Some(updated_at)) => Stored::Inserted(Placed {
                created_at,
                updated_at,
                queue_number: self.queue_number,
                queue_position: self.queue_position,
                estimated_wait_secs: self.estimated_wait_secs,
                presale_entry: self.draw_pending,
            }),
            _ if self.draw_pending && !self.entry => Stored::DrawPending,
            _ if self.draw_pending => Stored::EntryTaken,
            _ if self.admitted => Stored::KeyTaken,
            _ => Stored::QueueFull { queued: self.queued, left: self.left },
        };
        (self.id, stored)
    }
}

/// An order's lines as stored (`orders.lines`).
fn lines_json(lines: &[OrderLine]) -> Result<String, sqlx::Error> {
    serde_json::to_string(lines).map_err(|err| sqlx::Error::Encode(err.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(message_orders: usize, max_wait_ms: u64) -> Settings {
        Settings {
            partitions: 8,
            demand_factor: 0.0,
            insert_interval: Duration::ZERO,
            send_interval: Duration::from_millis(10),
            message_orders,
            send_max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    /// `count` orders of one event, so of one partition.
    fn orders_of(event_id: Uuid, count: usize) -> Vec<PurchaseMessage> {
        (0..count).map(|_| PurchaseMessage { order_id: Uuid::new_v4(), event_id, traceparent: None }).collect()
    }

    /// Two events of different partitions.
    fn two_partitions() -> (Uuid, Uuid) {
        loop {
            let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
            if partition_of(a, 8) != partition_of(b, 8) {
                return (a, b);
            }
        }
    }

    #[test]
    fn a_quiet_partition_sends_at_once_then_waits_to_fill_its_message() {
        let start = Instant::now();
        let mut unsent = Unsent::new(settings(4, 40));
        let event = Uuid::new_v4();
        unsent.add(orders_of(event, 1));
        assert_eq!(unsent.take_due(start).len(), 1, "quiet: at once");
        unsent.add(orders_of(event, 3));
        let later = start + Duration::from_millis(10);
        assert!(unsent.take_due(later).is_empty(), "three of four wait");
        assert_eq!(unsent.next_due(later), Some(start + Duration::from_millis(40)));
        unsent.add(orders_of(event, 1));
        assert_eq!(unsent.take_due(later).len(), 4, "four fill the message");
        unsent.add(orders_of(event, 2));
        let ms = |ms| start + Duration::from_millis(ms);
        assert!(unsent.take_due(ms(39)).is_empty());
        assert_eq!(unsent.take_due(ms(40)).len(), 2, "at the grid's next point");
        assert_eq!(unsent.next_due(ms(40)), None);
        unsent.add(orders_of(event, 1));
        assert_eq!(unsent.next_due(ms(41)), Some(ms(80)), "at most one step after the last message");
        assert_eq!(unsent.take_due(ms(121)).len(), 1);
        unsent.add(orders_of(event, 1));
        assert_eq!(unsent.take_due(ms(170)).len(), 1, "quiet for a whole step: at once");
    }

    #[test]
    fn partitions_that_wait_are_sent_together() {
        let start = Instant::now();
        let ms = |ms| start + Duration::from_millis(ms);
        let (a, b) = two_partitions();
        let mut unsent = Unsent::new(settings(32, 40));
        unsent.add(orders_of(a, 1));
        assert_eq!(unsent.take_due(ms(3)).len(), 1, "the first sending: the grid's origin");
        unsent.add(orders_of(b, 1));
        assert_eq!(unsent.take_due(ms(25)).len(), 1);
        unsent.add(orders_of(a, 2));
        unsent.add(orders_of(b, 3));
        assert_eq!(unsent.next_due(ms(30)), Some(ms(43)));
        assert!(unsent.take_due(ms(42)).is_empty());
        assert_eq!(unsent.take_due(ms(43)).len(), 5, "both at the same point");
    }

    #[test]
    fn partitions_wait_each_on_its_own_and_no_wait_sends_everything() {
        let start = Instant::now();
        let (a, b) = two_partitions();
        let mut unsent = Unsent::new(settings(4, 40));
        unsent.add(orders_of(a, 1));
        assert_eq!(unsent.take_due(start).len(), 1);
        unsent.add(orders_of(a, 1));
        unsent.add(orders_of(b, 1));
        let due = unsent.take_due(start + Duration::from_millis(5));
        assert_eq!(due.iter().map(|o| o.event_id).collect::<Vec<_>>(), [b], "b was quiet, a sent just now");
        assert_eq!(unsent.take_all().len(), 1, "a's order still waits, and goes when the api stops");

        let mut unsent = Unsent::new(settings(4, 0));
        unsent.add(orders_of(a, 1));
        assert_eq!(unsent.take_due(start).len(), 1);
        unsent.add(orders_of(a, 1));
        unsent.add(orders_of(b, 2));
        assert_eq!(unsent.take_due(start).len(), 3, "no wait: every partition at every sending");
    }
}
