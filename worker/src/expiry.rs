//! Hold expiry: `PENDING` orders past `expires_at` become `EXPIRED` and give their tickets
//! back, to the event's waiting list first, then to the next buyers. The same loop finishes
//! deletions with refunds that their api process did not (it crashed or was stopped midway:
//! `events.refunding_since` still set). Every worker process runs this loop; each step
//! takes the event's lock and `common::sales::changes` re-checks under it, so two workers
//! never expire the same hold, or refund the same order, twice.

use std::time::Duration;

use anyhow::Context;
use common::sales::{self, changes};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::poll::{Next, Round, Steps};

/// Most holds expired per event and per transaction, and most due holds read per scan.
const BATCH: i64 = 1_000;

/// Expires due holds, and finishes deletions, every `interval` until shutdown.
pub async fn run(
    db: PgPool,
    interval: Duration,
    offer_ttl: Duration,
    steps: Steps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut expiry = Expiry { db, offer_ttl, shutdown: shutdown.clone() };
    crate::poll::every("expiry", interval, &shutdown, &mut expiry, steps).await
}

/// The loop's round: expire what is due, then finish deletions left unfinished.
pub struct Expiry {
    pub db: PgPool,
    pub offer_ttl: Duration,
    pub shutdown: CancellationToken,
}

impl Round for Expiry {
    async fn round(&mut self) -> anyhow::Result<Next> {
        expire_due(&self.db, self.offer_ttl, &self.shutdown).await.context("expiring holds")?;
        finish_deletions(&self.db, &self.shutdown).await.context("finishing deletions with refunds")?;
        Ok(Next::Wait)
    }
}

/// Expires every hold that is due, one transaction per event, until none is left.
#[tracing::instrument(skip_all, err(level = "warn"))]
async fn expire_due(db: &PgPool, offer_ttl: Duration, shutdown: &CancellationToken) -> sqlx::Result<()> {
    while !shutdown.is_cancelled() {
        let events: Vec<Uuid> = sqlx::query_scalar!(
            r#"SELECT DISTINCT event_id AS "event_id!" FROM (
                 SELECT event_id FROM orders WHERE status = 'PENDING' AND expires_at <= now()
                 ORDER BY expires_at LIMIT $1
             ) due"#,
            BATCH
        )
        .fetch_all(db)
        .await?;
        if events.is_empty() {
            break;
        }
        let mut expired = 0;
        for event_id in events {
            let mut tx = db.begin().await?;
            let ids = match sales::lock_event(&mut tx, event_id).await? {
                Some(mut lock) => changes::expire_event(&mut lock, event_id, BATCH, offer_ttl).await?,
                None => Vec::new(),
            };
            tx.commit().await?;
            metrics::counter!("turnstile_holds_expired_total").increment(ids.len() as u64);
            if !ids.is_empty() {
                tracing::info!(%event_id, expired = ids.len(), "holds expired; tickets released");
            }
            expired += ids.len();
        }
        if expired == 0 {
            // Due holds exist but another worker is expiring them: leave them to it.
            break;
        }
    }
    Ok(())
}

/// Refunds the paid orders of events deleted with `?refund=true` whose deletion was left
/// unfinished, a batch per transaction, until each is done.
#[tracing::instrument(skip_all, err(level = "warn"))]
async fn finish_deletions(db: &PgPool, shutdown: &CancellationToken) -> sqlx::Result<()> {
    let events: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM events WHERE refunding_since IS NOT NULL ORDER BY refunding_since LIMIT 100"
    )
    .fetch_all(db)
    .await?;
    for event_id in events {
        let mut refunded = 0;
        while !shutdown.is_cancelled() {
            let mut tx = db.begin().await?;
            let done = match sales::lock_event(&mut tx, event_id).await? {
                Some(mut lock) => changes::refund_deleted_event(&mut lock, event_id, BATCH, None).await?,
                None => 0,
            };
            tx.commit().await?;
            refunded += done;
            if done == 0 {
                tracing::info!(%event_id, refunded, "deletion with refunds finished");
                break;
            }
        }
    }
    Ok(())
}
