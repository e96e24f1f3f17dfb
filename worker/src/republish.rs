//! The re-publisher: the orders table is the outbox of purchase messages. An order the api
//! accepted but whose message the broker never confirmed (broker down, api crashed between
//! commit and publish) is published again; so is an order whose confirmed message seems to
//! have vanished (still `QUEUED` long after). Redelivered duplicates are harmless: the
//! allocator skips orders that are no longer `QUEUED`.

use std::time::Duration;

use common::amqp::{Publisher, PurchaseMessage};
use common::config::WorkerConfig;
use futures_util::future::join_all;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Orders claimed per round.
const ROUND: i64 = 500;

pub async fn run(db: PgPool, publisher: Publisher, config: std::sync::Arc<WorkerConfig>, shutdown: CancellationToken) {
    let interval = Duration::from_millis(config.republish_interval_ms);
    let after = Duration::from_secs(config.republish_after_secs);
    let stale = Duration::from_secs(config.republish_stale_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        // Keep going while full rounds come back: a broker outage may have left many.
        loop {
            match round(&db, &publisher, after, stale).await {
                Ok((claimed, published)) => {
                    if claimed > 0 {
                        tracing::info!(claimed, published, "re-published queued orders");
                    }
                    if claimed < ROUND as usize || published < claimed || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "re-publisher round failed");
                    break;
                }
            }
        }
    }
}

/// Claims a round of orders (stamping `published_at`, in a short transaction of its own so
/// that no order row stays locked while the broker is slow; `SKIP LOCKED` lets several
/// workers claim disjoint rounds), publishes them, and un-stamps the ones the broker did
/// not confirm so the next round retries them.
async fn round(db: &PgPool, publisher: &Publisher, after: Duration, stale: Duration) -> sqlx::Result<(usize, usize)> {
    let claimed: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE orders SET published_at = now()
         WHERE id IN (
             SELECT id FROM orders
             WHERE status = 'QUEUED'
               AND ((published_at IS NULL AND created_at < now() - make_interval(secs => $1))
                    OR published_at < now() - make_interval(secs => $2))
             ORDER BY created_at
             LIMIT $3
             FOR UPDATE SKIP LOCKED)
         RETURNING id, event_id",
    )
    .bind(after.as_secs_f64())
    .bind(stale.as_secs_f64())
    .bind(ROUND)
    .fetch_all(db)
    .await?;
    if claimed.is_empty() {
        return Ok((0, 0));
    }
    let results = join_all(claimed.iter().map(|&(order_id, event_id)| async move {
        (order_id, publisher.publish_purchase(&PurchaseMessage { order_id, event_id }).await)
    }))
    .await;
    let failed: Vec<Uuid> = results
        .iter()
        .filter_map(|(id, result)| {
            result.as_ref().err().map(|err| {
                tracing::debug!(order_id = %id, error = %err, "re-publish failed");
                *id
            })
        })
        .collect();
    if !failed.is_empty() {
        sqlx::query("UPDATE orders SET published_at = NULL WHERE id = ANY($1) AND status = 'QUEUED'")
            .bind(&failed)
            .execute(db)
            .await?;
    }
    Ok((claimed.len(), claimed.len() - failed.len()))
}
