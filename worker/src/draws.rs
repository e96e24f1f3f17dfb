//! The pre-sale draws, and the purchase queues' lengths as metrics. Every worker process
//! runs this loop; a draw takes its event's lock and clears the draw under it
//! ([`common::sales::draw`]), so two workers (or a worker and an api process, which draws
//! when an order arrives after the opening) never draw one event twice, and a worker that
//! dies mid-draw leaves it to the next round, its own or another worker's.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use common::amqp::{Publisher, partition_of};
use common::sales::draw;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::poll::{Next, Round, Steps};

/// Rounds between two readings of the queues' lengths.
const GAUGE_EVERY: u32 = 5;

/// Draws the pre-sales that are due, every `interval` until shutdown.
pub async fn run(
    db: PgPool,
    publisher: Publisher,
    partitions: u16,
    interval: Duration,
    steps: Steps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut draws = Draws { db, publisher, partitions, rounds: 0 };
    crate::poll::every("draws", interval, &shutdown, &mut draws, steps).await
}

struct Draws {
    db: PgPool,
    publisher: Publisher,
    partitions: u16,
    rounds: u32,
}

impl Round for Draws {
    async fn round(&mut self) -> anyhow::Result<Next> {
        for event_id in draw::due(&self.db).await.context("finding due draws")? {
            draw::draw_and_send(&self.db, &self.publisher, event_id).await.context("drawing a pre-sale")?;
        }
        if self.rounds.is_multiple_of(GAUGE_EVERY) {
            queue_lengths(&self.db, self.partitions).await.context("reading the queues' lengths")?;
        }
        self.rounds = self.rounds.wrapping_add(1);
        Ok(Next::Wait)
    }
}

/// `turnstile_queued_orders{partition}`: orders numbered and not yet decided, over the
/// events of each partition (from the queues' counters: one row per event with a queue).
async fn queue_lengths(db: &PgPool, partitions: u16) -> sqlx::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT q.event_id, q.issued - e.queue_decided AS "waiting!"
           FROM event_queues q JOIN events e ON e.id = q.event_id WHERE q.issued > e.queue_decided"#
    )
    .fetch_all(db)
    .await?;
    let mut per_partition: HashMap<u16, i64> = (0..partitions).map(|p| (p, 0)).collect();
    for row in rows {
        *per_partition.entry(partition_of(row.event_id, partitions)).or_default() += row.waiting;
    }
    for (partition, waiting) in per_partition {
        metrics::gauge!("turnstile_queued_orders", "partition" => partition.to_string()).set(waiting as f64);
    }
    Ok(())
}
