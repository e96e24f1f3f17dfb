//! Which partitions this worker prefers, so that M worker processes share the N partitions
//! instead of the first one to start taking them all.
//!
//! Every worker subscribes to every partition queue; the queues have
//! `x-single-active-consumer`, so RabbitMQ delivers a partition to one subscriber at a time
//! and hands it to a waiting subscriber the moment the active one disconnects (fail-over
//! needs nothing from us). What RabbitMQ does not do is balance: the first subscriber keeps
//! a partition for ever. So workers announce themselves in the `workers` table with a
//! heartbeat; the live workers ordered by id give each one a rank `r` of `M`, and a worker
//! *prefers* partition `k` when `k mod M = r`. A worker that is subscribed to a partition
//! it does not prefer steps back now and then (closes its channel between batches and
//! subscribes again, at the back of the line), which lets the preferring worker's waiting
//! subscription become active. See [`crate::allocate`].

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::poll::{Next, Round};

/// A worker is considered gone when its heartbeat is this many intervals old.
const MISSED_HEARTBEATS: u32 = 5;

/// This worker's place among the live workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub rank: usize,
    pub members: usize,
}

impl Assignment {
    /// Until the first heartbeat succeeds, a worker assumes it is alone.
    pub const ALONE: Assignment = Assignment { rank: 0, members: 1 };

    pub fn prefers(&self, partition: u16) -> bool {
        usize::from(partition) % self.members.max(1) == self.rank
    }

    pub fn preferred(&self, partitions: u16) -> Vec<u16> {
        (0..partitions).filter(|&k| self.prefers(k)).collect()
    }
}

/// Heartbeats until shutdown, publishing this worker's assignment whenever it changes, then
/// removes the worker's row so the others take over its preferences at once. A failed
/// heartbeat keeps the last assignment and is retried (see [`crate::poll`]).
pub async fn run(
    db: PgPool,
    worker_id: Uuid,
    interval: Duration,
    partitions: u16,
    assignment: watch::Sender<Assignment>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    let mut heartbeat =
        Heartbeat { db: db.clone(), worker_id, hostname, expiry: interval * MISSED_HEARTBEATS, partitions, assignment };
    let result = crate::poll::every("heartbeat", interval, &shutdown, &mut heartbeat, crate::poll::Steps::none()).await;
    if let Err(err) = sqlx::query!("DELETE FROM workers WHERE id = $1", worker_id).execute(&db).await {
        tracing::warn!(error = %err, "could not remove this worker's heartbeat row; it expires by itself");
    }
    result
}

/// One heartbeat: this worker's row refreshed, and its assignment recomputed.
struct Heartbeat {
    db: PgPool,
    worker_id: Uuid,
    hostname: String,
    expiry: Duration,
    partitions: u16,
    assignment: watch::Sender<Assignment>,
}

impl Round for Heartbeat {
    async fn round(&mut self) -> anyhow::Result<Next> {
        let current = beat(&self.db, self.worker_id, &self.hostname, self.expiry).await.context("heartbeat")?;
        let preferred = current.preferred(self.partitions).len();
        metrics::gauge!("turnstile_partitions_preferred").set(preferred as f64);
        if self.assignment.send_if_modified(|old| std::mem::replace(old, current) != current) {
            tracing::info!(
                worker_id = %self.worker_id,
                rank = current.rank,
                members = current.members,
                preferred = ?current.preferred(self.partitions),
                "partition assignment"
            );
        }
        Ok(Next::Wait)
    }
}

pub async fn check_health(config: common::config::WorkerConfig) -> anyhow::Result<()> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    let db = common::db::connect(&config.database).await?;
    let expiry = config.heartbeat() * MISSED_HEARTBEATS;
    let alive = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM workers WHERE hostname = $1 AND heartbeat_at > now() - make_interval(secs => $2))
           AS "alive!""#,
        hostname,
        expiry.as_secs_f64()
    )
    .fetch_one(&db)
    .await?;
    anyhow::ensure!(alive, "no worker on host {hostname:?} has sent a heartbeat within {expiry:?}");
    Ok(())
}

#[tracing::instrument(skip(db, hostname, expiry), err(level = "warn"))]
async fn beat(db: &PgPool, worker_id: Uuid, hostname: &str, expiry: Duration) -> Result<Assignment, sqlx::Error> {
    let expiry_secs = expiry.as_secs_f64();
    sqlx::query!(
        "INSERT INTO workers (id, hostname) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
        worker_id,
        hostname
    )
    .execute(db)
    .await?;
    sqlx::query!("DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => $1)", expiry_secs)
        .execute(db)
        .await?;
    let live = sqlx::query_scalar!("SELECT id FROM workers ORDER BY id").fetch_all(db).await?;
    Ok(rank_of(worker_id, &live))
}

fn rank_of(worker_id: Uuid, live: &[Uuid]) -> Assignment {
    match live.iter().position(|id| *id == worker_id) {
        Some(rank) => Assignment { rank, members: live.len() },
        // Our own row was just written; if it is missing, behave as if alone.
        None => Assignment::ALONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_spread_round_robin() {
        let a = Assignment { rank: 0, members: 2 };
        let b = Assignment { rank: 1, members: 2 };
        assert_eq!(a.preferred(8), [0, 2, 4, 6]);
        assert_eq!(b.preferred(8), [1, 3, 5, 7]);
        assert_eq!(Assignment::ALONE.preferred(3), [0, 1, 2]);
        let c = Assignment { rank: 2, members: 3 };
        assert_eq!(c.preferred(8), [2, 5]);
    }

    #[test]
    fn rank_follows_id_order() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
        assert_eq!(rank_of(ids[1], &ids), Assignment { rank: 1, members: 3 });
        assert_eq!(rank_of(Uuid::from_u128(9), &ids), Assignment::ALONE);
    }
}
