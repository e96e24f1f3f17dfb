//! The re-publisher: the orders table is the outbox of purchase messages. An order the api
//! stored but whose message never reached a queue (broker down, api crashed between commit
//! and publish, message lost) is published again. Redelivered duplicates are harmless: the
//! allocator skips orders that are no longer `QUEUED`.
//!
//! Nothing is written when a message is confirmed (that was a second write of every order
//! row); instead an order is known to be missing when it is still `QUEUED`
//! `REPUBLISH_AFTER_SECS` after it was stored and
//! - its partition's consumer has decided orders created `REPUBLISH_AFTER_SECS` later than
//!   it (`partition_progress`: queues are first in, first out, so its message, sent when it
//!   was stored, would have come first), or
//! - its partition's queue has held no message ready for delivery, and its consumer has
//!   decided nothing, since the previous round (nothing is waiting or being worked through
//!   that could be it: a consumer holds the last messages of a drained backlog, prefetched,
//!   while the queue shows none ready), or
//! - it has waited `REPUBLISH_STALE_SECS` whatever the queue says.
//!
//! A backlog (orders waiting behind each other in a long queue) is therefore left alone,
//! and a lost message is found as soon as its partition moves past it. `published_at`
//! records when an order was last re-published, so that it is not sent again before the
//! same wait has passed.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::amqp::{Publisher, PurchaseMessage};
use common::config::WorkerConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::poll::{Next, Round, Steps};

/// Orders claimed per round.
const ROUND: i64 = 500;

/// Re-publishes missing orders every `REPUBLISH_INTERVAL_MS` until shutdown.
pub async fn run(
    db: PgPool,
    publisher: Publisher,
    config: std::sync::Arc<WorkerConfig>,
    steps: Steps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut republisher = Republisher {
        db,
        publisher,
        after: Duration::from_secs(config.republish_after_secs),
        stale: Duration::from_secs(config.republish_stale_secs),
        partitions: config.broker.partitions,
        idle_before: HashMap::new(),
    };
    let interval = Duration::from_millis(config.republish_interval_ms);
    crate::poll::every("re-publisher", interval, &shutdown, &mut republisher, steps).await
}

/// The loop's round; full rounds go again at once (a broker outage may have left many).
pub struct Republisher {
    pub db: PgPool,
    pub publisher: Publisher,
    pub after: Duration,
    pub stale: Duration,
    /// `PARTITIONS`: the partitions a consumer reads.
    pub partitions: u16,
    /// The partitions whose queue had nothing ready at the previous round, with when their
    /// consumer last recorded progress then.
    pub idle_before: HashMap<i16, Option<DateTime<Utc>>>,
}

impl Round for Republisher {
    async fn round(&mut self) -> anyhow::Result<Next> {
        let idle = self.idle_partitions().await?;
        let (claimed, published) =
            round(&self.db, &self.publisher, self.after, self.stale, &idle, self.partitions).await?;
        if claimed > 0 {
            tracing::info!(claimed, published, "re-published queued orders");
        }
        Ok(if claimed == ROUND as usize && published == claimed { Next::Again } else { Next::Wait })
    }
}

impl Republisher {
    /// The partitions idle since the previous round: nothing ready in their queue then and
    /// now, and no progress recorded by their consumer in between. Unknown depths (broker
    /// down) count as not idle.
    async fn idle_partitions(&mut self) -> sqlx::Result<Vec<i16>> {
        let ready_none: Vec<i16> = match self.publisher.ready_messages().await {
            Ok(depths) => depths.into_iter().filter(|(_, ready)| *ready == 0).map(|(p, _)| p as i16).collect(),
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the partition queues' depths");
                Vec::new()
            }
        };
        let progress: HashMap<i16, DateTime<Utc>> =
            sqlx::query!("SELECT partition, updated_at FROM partition_progress WHERE partition = ANY($1)", &ready_none)
                .fetch_all(&self.db)
                .await?
                .into_iter()
                .map(|row| (row.partition, row.updated_at))
                .collect();
        let now: HashMap<i16, Option<DateTime<Utc>>> =
            ready_none.iter().map(|p| (*p, progress.get(p).copied())).collect();
        let idle = now.iter().filter(|(p, at)| self.idle_before.get(p) == Some(at)).map(|(p, _)| *p).collect();
        self.idle_before = now;
        Ok(idle)
    }
}

/// Claims a round of orders (stamping `published_at`, in a short transaction of its own so
/// that no order row stays locked while the broker is slow; `SKIP LOCKED` lets several
/// workers claim disjoint rounds), publishes them, and un-stamps them if the broker did not
/// confirm, so the next round retries them.
#[tracing::instrument(skip_all, err(level = "warn"))]
async fn round(
    db: &PgPool,
    publisher: &Publisher,
    after: Duration,
    stale: Duration,
    idle: &[i16],
    partitions: u16,
) -> sqlx::Result<(usize, usize)> {
    // Partition by partition (`orders_queued_by_partition`), each search ending at its own
    // bound: the conditions above, as "created before" a time. Orders of no partition (or
    // of one beyond `PARTITIONS`, which no consumer reads) have no consumer to wait for.
    // Planned for the round's values each time: a generic plan, made for any number of
    // partitions, searched those orders by age alone, walking every queued order of a
    // backlog (0.2-1.5 s a round under a million of them, against 0.3 ms).
    let mut tx = db.begin().await?;
    sqlx::query!("SET LOCAL plan_cache_mode = force_custom_plan").execute(&mut *tx).await?;
    let claimed = sqlx::query!(
        "UPDATE orders SET published_at = now()
         WHERE id IN (
             SELECT c.id FROM (
                 SELECT m.id, m.created_at
                 FROM generate_series(0, $5::int2 - 1) AS p(partition)
                 LEFT JOIN partition_progress pp ON pp.partition = p.partition
                 CROSS JOIN LATERAL (
                     SELECT o.id, o.created_at FROM orders o
                     WHERE o.status = 'QUEUED' AND o.partition = p.partition
                       AND o.created_at < CASE WHEN p.partition = ANY($3::int2[]) THEN now() - make_interval(secs => $1)
                           ELSE least(now() - make_interval(secs => $1),
                                      greatest(now() - make_interval(secs => $2),
                                               pp.seen_through - make_interval(secs => $1))) END
                       -- A pre-sale entry has no message until its draw (which sends it).
                       AND NOT (o.presale_entry AND o.queue_number IS NULL)
                       AND (o.published_at IS NULL OR o.published_at < now() - make_interval(secs => $1))
                     ORDER BY o.created_at
                     LIMIT $4
                     FOR UPDATE OF o SKIP LOCKED
                 ) m
                 UNION ALL
                 SELECT * FROM (
                     SELECT o.id, o.created_at FROM orders o
                     WHERE o.status = 'QUEUED' AND (o.partition IS NULL OR o.partition >= $5::int2)
                       AND o.created_at < now() - make_interval(secs => $1)
                       AND NOT (o.presale_entry AND o.queue_number IS NULL)
                       AND (o.published_at IS NULL OR o.published_at < now() - make_interval(secs => $1))
                     ORDER BY o.created_at
                     LIMIT $4
                     FOR UPDATE OF o SKIP LOCKED
                 ) unread
             ) c
             ORDER BY c.created_at
             LIMIT $4)
         RETURNING id, event_id, traceparent",
        after.as_secs_f64(),
        stale.as_secs_f64(),
        idle,
        ROUND,
        i16::try_from(partitions).unwrap_or(i16::MAX)
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if claimed.is_empty() {
        return Ok((0, 0));
    }
    // Each order keeps its trace: its decision continues the request that placed it.
    let orders: Vec<PurchaseMessage> = claimed
        .iter()
        .map(|row| PurchaseMessage { order_id: row.id, event_id: row.event_id, traceparent: row.traceparent.clone() })
        .collect();
    if let Err(err) = publisher.publish_purchases(&orders).await {
        tracing::debug!(orders = orders.len(), error = %err, "re-publish failed");
        let ids: Vec<Uuid> = claimed.iter().map(|row| row.id).collect();
        sqlx::query!("UPDATE orders SET published_at = NULL WHERE id = ANY($1) AND status = 'QUEUED'", &ids)
            .execute(db)
            .await?;
        return Ok((claimed.len(), 0));
    }
    metrics::counter!("turnstile_orders_republished_total").increment(claimed.len() as u64);
    Ok((claimed.len(), claimed.len()))
}
