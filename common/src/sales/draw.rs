//! The pre-sale draw: at an event's `sales_start`, its pre-sale entries (orders placed
//! between `prequeue_opens_at` and `sales_start`, stored `QUEUED` without a queue number)
//! are numbered in one random order that anyone can recompute: sorted by
//! `SHA-256(draw_seed ‖ order id)`, the seed (32 bytes, made before the pre-sale opened and
//! shown only as its SHA-256 until the opening) followed by the 16 bytes of the order id
//! (see `migrations/0020_presale_draw.sql`, `draw_key`).
//!
//! **Exactly once.** The draw holds the event's lock and then its queue row's
//! (`event_queues`), and clears `draw_pending` there in the same transaction: a second draw,
//! from another worker or api process, waits for the first and then finds nothing to do; a
//! crash before the commit leaves everything as it was, for the next one. The api's insert
//! statement locks the same queue row, so no entry is stored after the draw and no order is
//! numbered before it.
//!
//! **In draw order.** The entries' purchase messages are sent after the commit, in number
//! order, and whatever sends them, the worker decides an event's drawn entries before any
//! later order of that event ([`drawn_entries`]): an order placed after the opening may
//! reach the partition queue first, but it is not decided first.

use std::time::Instant;

use sqlx::PgPool;
use uuid::Uuid;

use super::{EventLock, lock_event};
use crate::amqp::{Publisher, PurchaseMessage};
use crate::domain::{OrderStatus, OrderTrigger, Transition};

/// What a call to [`draw`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Drawn {
    /// The event has no draw waiting (none was set, or it happened already), or no longer
    /// exists.
    Nothing,
    /// Its `sales_start` has not come yet (by the database's clock).
    NotYet,
    /// This call drew: the entries, in their new number order.
    Drew(Vec<PurchaseMessage>),
}

/// Draws the event's pre-sale if it is due and not drawn yet, in one transaction (see the
/// module's summary). The caller sends the returned messages ([`draw_and_send`] does both).
pub async fn draw(db: &PgPool, event_id: Uuid) -> sqlx::Result<Drawn> {
    let started = Instant::now();
    let mut tx = db.begin().await?;
    let Some(mut lock) = lock_event(&mut tx, event_id).await? else { return Ok(Drawn::Nothing) };
    let state = sqlx::query!(
        r#"SELECT q.draw_pending, coalesce(e.sales_start <= now(), false) AS "due!", e.draw_seed
           FROM event_queues q JOIN events e ON e.id = q.event_id WHERE q.event_id = $1 FOR UPDATE OF q"#,
        event_id
    )
    .fetch_optional(lock.conn())
    .await?;
    let Some(state) = state.filter(|s| s.draw_pending) else { return Ok(Drawn::Nothing) };
    let Some(seed) = state.draw_seed.filter(|_| state.due) else { return Ok(Drawn::NotYet) };
    let numbered = number_entries(&mut lock, event_id, &seed).await?;
    tx.commit().await?;
    metrics::histogram!("turnstile_draw_duration_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("turnstile_draw_entries_total").increment(numbered.len() as u64);
    tracing::info!(%event_id, entries = numbered.len(), elapsed_ms = started.elapsed().as_millis() as u64, "pre-sale drawn");
    Ok(Drawn::Drew(numbered))
}

/// Numbers the event's open entries after its queue's last number, in draw order, and
/// closes the draw: one statement. Returns the entries in number order.
async fn number_entries(lock: &mut EventLock<'_>, event_id: Uuid, seed: &[u8]) -> sqlx::Result<Vec<PurchaseMessage>> {
    lock.check_holds(event_id)?;
    let rows = sqlx::query!(
        r#"WITH entries AS (
               SELECT o.id, row_number() OVER (ORDER BY draw_key($2, o.id)) AS place
               FROM orders o
               WHERE o.event_id = $1 AND o.presale_entry AND o.queue_number IS NULL AND o.status = 'QUEUED'
           ),
           numbered AS (
               UPDATE orders o SET queue_number = q.issued + e.place, published_at = now()
               FROM entries e, event_queues q
               WHERE o.id = e.id AND q.event_id = $1
               RETURNING o.id, o.queue_number, o.quantity, o.traceparent
           ),
           queue AS (
               UPDATE event_queues SET draw_pending = false,
                      issued = issued + (SELECT count(*) FROM numbered),
                      tickets = tickets + (SELECT coalesce(sum(quantity), 0) FROM numbered)
               WHERE event_id = $1
           ),
           event AS (
               UPDATE events SET drawn_at = clock_timestamp(), draw_entries = (SELECT count(*) FROM numbered)
               WHERE id = $1
           )
           SELECT id, traceparent FROM numbered ORDER BY queue_number"#,
        event_id,
        seed
    )
    .fetch_all(lock.conn())
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| PurchaseMessage { order_id: row.id, event_id, traceparent: row.traceparent })
        .collect())
}

/// [`draw`], then the entries' purchase messages sent, in number order. A send that fails
/// is left to the re-publisher (the entries are `QUEUED` and numbered, like any order whose
/// message was lost).
pub async fn draw_and_send(db: &PgPool, publisher: &Publisher, event_id: Uuid) -> sqlx::Result<Drawn> {
    let drawn = draw(db, event_id).await?;
    if let Drawn::Drew(messages) = &drawn
        && !messages.is_empty()
        && let Err(err) = publisher.publish_purchases(messages).await
    {
        tracing::warn!(%event_id, orders = messages.len(), error = %err, "drawn entries not sent; the re-publisher will");
    }
    Ok(drawn)
}

/// Events whose draw is due (their `sales_start` has come), for the worker's loop.
pub async fn due(db: &PgPool) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        "SELECT q.event_id FROM event_queues q JOIN events e ON e.id = q.event_id
         WHERE q.draw_pending AND e.sales_start <= now() ORDER BY e.sales_start"
    )
    .fetch_all(db)
    .await
}

/// The locked events' drawn entries still `QUEUED`, each event's in number order: the
/// allocator decides these before any other order of their event.
pub async fn drawn_entries(lock: &mut EventLock<'_>, event_ids: &[Uuid]) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    let rows = sqlx::query!(
        r#"SELECT event_id, id FROM orders
           WHERE event_id = ANY($1) AND presale_entry AND queue_number IS NOT NULL AND status = 'QUEUED'
           ORDER BY event_id, queue_number"#,
        event_ids
    )
    .fetch_all(lock.conn())
    .await?;
    Ok(rows.into_iter().map(|row| (row.event_id, row.id)).collect())
}

/// Withdraws a pre-sale entry at its owner's request: `QUEUED` → `CANCELLED`, if the order
/// is an entry not drawn yet (under its event's lock, which the draw also takes). Returns
/// the transition (`Impossible` for any other order).
pub async fn withdraw_entry(locked: &mut super::changes::LockedOrder<'_>) -> sqlx::Result<Transition> {
    let order = &locked.order;
    if order.status != OrderStatus::Queued || !order.open_entry {
        return Ok(match order.status.apply(OrderTrigger::EntryWithdrawn) {
            Transition::AlreadyThere => Transition::AlreadyThere,
            _ => Transition::Impossible,
        });
    }
    super::changes::move_locked(locked, OrderTrigger::EntryWithdrawn).await
}

/// The seed's SHA-256 and the entry keys are computed by the database (`sha256`,
/// `draw_key`); this is the same key, for checking a draw from outside.
pub fn key(seed: &[u8], order_id: Uuid) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(seed);
    hasher.update(order_id.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    /// The draw's order of entries that arrived in order 0..n, for one seed.
    fn draw_order(seed: u64, n: u128) -> Vec<u128> {
        let seed: Vec<u8> = sha2::Sha256::digest(seed.to_le_bytes()).to_vec();
        let mut entries: Vec<u128> = (0..n).collect();
        entries.sort_by_key(|i| key(&seed, Uuid::from_u128(*i)));
        entries
    }

    /// Over 2,000 draws of 100 entries, no draw is the arrival order, and where the first
    /// arrival lands is spread evenly: each tenth of the line about 200 times (a uniform
    /// draw puts it there with probability 1/10; 120 and 280 are over 5 standard deviations
    /// away), and the first 10 places are not the first 10 arrivals more than chance allows.
    #[test]
    fn the_draw_is_not_arrival_order() {
        let mut tenths = [0u32; 10];
        let mut early_among_winners = 0usize;
        for seed in 0..2_000 {
            let order = draw_order(seed, 100);
            assert_ne!(order, (0..100).collect::<Vec<_>>(), "seed {seed}: arrival order");
            let place = order.iter().position(|&i| i == 0).expect("drawn");
            tenths[place / 10] += 1;
            early_among_winners += order[..10].iter().filter(|&&i| i < 10).count();
        }
        assert!(tenths.iter().all(|n| (120..=280).contains(n)), "{tenths:?}");
        // Expected 10 × 10/100 = 1 early arrival among the 10 winners per draw.
        assert!((1_600..=2_400).contains(&early_among_winners), "{early_among_winners}");
    }

    #[test]
    fn the_key_is_sha256_of_the_seed_then_the_order_ids_bytes() {
        let seed = [7u8; 32];
        let order = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let mut bytes = seed.to_vec();
        bytes.extend_from_slice(order.as_bytes());
        assert_eq!(key(&seed, order), <[u8; 32]>::from(sha2::Sha256::digest(&bytes)));
    }
}
