//! What the purchase path needs to know of an event (its name, date, price, currency, limits,
//! ticket types and promo codes, and that it is not deleted), kept in memory so that accepting an order costs the
//! database no read. The `event_changes` notification (triggers on `events`, `ticket_types`
//! and `promo_codes`, for any change but `sold`, `capacity` and `uses`, and for a new ticket
//! type, so for every new event) drops the event, in every api process, within milliseconds of
//! the commit, and [`EventCatalog::keep_warm`] reads it again, with whatever else was announced
//! in the same moment, in one statement: an event is in memory before its first buyer, and an
//! on-sale's first second (or a day of many events' first orders) reads nothing. An event not
//! read that way (the api started after it was announced, a read failed, the catalog was full)
//! is read by its first lookup. While the listener is disconnected (notifications may be
//! missed), every lookup reads the database, as before.
//!
//! Not the authority: the worker decides under the event row's lock, and rejects orders
//! for an event that was deleted or has started meanwhile (`EVENT_UNAVAILABLE`). A price
//! changed in the same few milliseconds as a purchase may apply to it or not, as if the
//! request had arrived a moment earlier or later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The `NOTIFY` channel of changed event ids (migration 0007).
pub const CHANNEL: &str = "event_changes";

/// Above this many remembered events, the catalog starts over (a bound on memory); reading
/// announced events never makes it start over, and stops adding at this bound.
const KEPT: usize = 100_000;

/// How long announcements gather before they are read (an organizer's import, an operator's
/// SQL over many events, a reconnected listener announce many at once).
const GATHER: Duration = Duration::from_millis(20);

/// Most announced events read by one statement.
const READ_AT_ONCE: usize = 1_000;

#[derive(Clone, Debug)]
pub struct EventForSale {
    pub id: Uuid,
    pub name: String,
    pub starts_at: DateTime<Utc>,
    /// No ticket type sells before it.
    pub sales_start: Option<DateTime<Utc>>,
    /// From when orders join the pre-sale queue, drawn by lot at `sales_start`.
    pub prequeue_opens_at: Option<DateTime<Utc>>,
    pub currency: String,
    /// Most tickets in one order, over all its lines.
    pub max_per_order: i32,
    pub max_per_buyer: Option<i32>,
    /// The type `{event_id, quantity}` buys.
    pub default_ticket_type_id: Option<Uuid>,
    /// Its ticket types that are not withdrawn, in listing order.
    pub types: sqlx::types::Json<Vec<TypeForSale>>,
    /// Its live (not withdrawn) promo codes.
    pub codes: sqlx::types::Json<Vec<CodeForSale>>,
}

/// A promo code as the purchase rules see it; its uses are the worker's to count.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct CodeForSale {
    pub id: Uuid,
    pub code: String,
    pub percent_off: Option<Decimal>,
    pub amount_off: Option<Decimal>,
    /// `None`: every type of the event.
    pub ticket_type_ids: Option<Vec<Uuid>>,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct TypeForSale {
    pub id: Uuid,
    pub name: String,
    pub price: Decimal,
    pub max_per_order: Option<i32>,
    pub max_per_buyer: Option<i32>,
    pub sales_start: Option<DateTime<Utc>>,
    pub sales_end: Option<DateTime<Utc>>,
    /// Sold only under a promo code that names it.
    pub requires_promo_code: bool,
}

/// Where an event's sale stands at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SalePhase {
    /// Before `sales_start`, with no pre-sale queue open (yet).
    NotYet,
    /// Between `prequeue_opens_at` and `sales_start`: orders are pre-sale entries.
    PreQueue,
    /// From `sales_start` (or always, without one) until the event starts.
    Open,
    /// The event has started.
    Over,
}

impl EventForSale {
    pub fn on_sale(&self, now: DateTime<Utc>) -> bool {
        self.starts_at > now
    }

    pub fn phase(&self, now: DateTime<Utc>) -> SalePhase {
        match (self.sales_start, self.prequeue_opens_at) {
            _ if !self.on_sale(now) => SalePhase::Over,
            (Some(start), _) if now >= start => SalePhase::Open,
            (Some(_), Some(opens)) if now >= opens => SalePhase::PreQueue,
            (Some(_), _) => SalePhase::NotYet,
            (None, _) => SalePhase::Open,
        }
    }

    pub fn ticket_type(&self, id: Uuid) -> Option<&TypeForSale> {
        self.types.iter().find(|t| t.id == id)
    }

    /// The live code of this name, whatever its case.
    pub fn promo_code(&self, code: &str) -> Option<&CodeForSale> {
        self.codes.iter().find(|c| c.code.eq_ignore_ascii_case(code))
    }
}

impl CodeForSale {
    /// Whether it applies to tickets of this type.
    pub fn applies_to(&self, type_id: Uuid) -> bool {
        self.ticket_type_ids.as_ref().is_none_or(|ids| ids.contains(&type_id))
    }
}

impl TypeForSale {
    /// Whether `now` is inside the sale window.
    pub fn on_sale(&self, now: DateTime<Utc>) -> bool {
        self.sales_start.is_none_or(|start| now >= start) && self.sales_end.is_none_or(|end| now < end)
    }
}

#[derive(Default)]
pub struct EventCatalog {
    events: RwLock<HashMap<Uuid, EventForSale>>,
    /// Raised by every forgetting: a read that started before it must not be kept.
    generation: AtomicU64,
    /// Whether notifications are being received (set by the listener).
    synced: AtomicBool,
    /// The reads under way, by event: one at a time per event.
    reading: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Events forgotten and not read again yet, for [`Self::keep_warm`]; one announced again
    /// while its read was under way is here again, and that read is not kept.
    announced: Mutex<HashSet<Uuid>>,
    /// Wakes [`Self::keep_warm`].
    announcement: tokio::sync::Notify,
    /// Raised when notifications start or stop being received: a read of announced events
    /// that started before is not kept.
    epoch: AtomicU64,
}

/// The right to read one event: held by one lookup at a time; released (and forgotten once
/// nobody else waits for it) when dropped, also by a request that was cancelled.
struct ReadTurn<'a> {
    catalog: &'a EventCatalog,
    id: Uuid,
    gate: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> ReadTurn<'a> {
    async fn take(catalog: &'a EventCatalog, id: Uuid) -> Self {
        let gate = catalog.reading.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().clone();
        let held = Some(gate.clone().lock_owned().await);
        Self { catalog, id, gate, held }
    }
}

impl Drop for ReadTurn<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut reading = self.catalog.reading.lock().unwrap_or_else(|e| e.into_inner());
        // Held by the map and by this turn only: nobody waits for it.
        if Arc::strong_count(&self.gate) == 2 {
            reading.remove(&self.id);
        }
    }
}

impl EventCatalog {
    /// The live (not deleted) event, from memory when possible. Concurrent misses of one
    /// event (an on-sale's first second: every buyer at once) wait for a single read, which
    /// they then find in memory; while notifications are not received, nothing is kept, and
    /// each lookup reads.
    pub async fn get(&self, db: &PgPool, id: Uuid) -> Result<Option<EventForSale>, sqlx::Error> {
        if let Some(event) = self.kept(id) {
            return Ok(Some(event));
        }
        let _turn = if self.synced.load(Ordering::Acquire) { Some(ReadTurn::take(self, id).await) } else { None };
        if let Some(event) = self.kept(id) {
            return Ok(Some(event));
        }
        let synced = self.synced.load(Ordering::Acquire);
        let generation = self.generation.load(Ordering::Acquire);
        let event = read(db, id).await?;
        metrics::counter!("turnstile_catalog_reads_total", "by" => "lookup").increment(1);
        if let Some(event) = &event
            && synced
        {
            let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
            // A change announced while we read may not be in what we read: keep nothing.
            if self.generation.load(Ordering::Acquire) == generation && self.synced.load(Ordering::Acquire) {
                if events.len() >= KEPT {
                    events.clear();
                }
                events.insert(id, event.clone());
                record_size(&events);
            }
        }
        Ok(event)
    }

    /// The event as remembered, if notifications are being received.
    fn kept(&self, id: Uuid) -> Option<EventForSale> {
        if !self.synced.load(Ordering::Acquire) {
            return None;
        }
        self.events.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    /// The event changed: read it again, by [`Self::keep_warm`] or the next lookup.
    pub fn forget(&self, id: Uuid) {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        events.remove(&id);
        record_size(&events);
        self.announce([id]);
    }

    /// Hands events to [`Self::keep_warm`] (called with the events' lock held, so that a read
    /// of them kept afterwards was not under way before).
    fn announce(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if announced.len() >= KEPT {
                break;
            }
            announced.insert(id);
        }
        self.announcement.notify_one();
    }

    /// Applies a notification's payload, an event id.
    pub fn forget_announced(&self, payload: &str) {
        match payload.parse() {
            Ok(id) => self.forget(id),
            Err(_) => tracing::warn!(payload, "unreadable event change notification"),
        }
    }

    /// Notifications are (again) being received: start from an empty catalog, and read again
    /// what it held (changes while the listener was away were not announced).
    pub fn synced(&self) {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.announce(events.drain().map(|(id, _)| id));
        record_size(&events);
        self.synced.store(true, Ordering::Release);
    }

    /// The listener lost its connection: read the database until it is back.
    pub fn lost(&self) {
        self.synced.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads announced events back into the catalog until shutdown: once announcements have
    /// gathered for [`GATHER`], up to [`READ_AT_ONCE`] events a statement. A failed read is
    /// logged and its events left to their first lookups.
    pub async fn keep_warm(self: Arc<Self>, db: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.announcement.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(GATHER) => {}
            }
            loop {
                let (ids, epoch) = self.take_announced();
                if ids.is_empty() {
                    break;
                }
                match read_many(&db, &ids).await {
                    Ok(read) => self.keep_announced(epoch, read),
                    Err(err) => {
                        tracing::warn!(error = %err, events = ids.len(), "reading announced events failed; their first lookups will");
                        break;
                    }
                }
                metrics::counter!("turnstile_catalog_reads_total", "by" => "announcement").increment(ids.len() as u64);
            }
        }
    }

    /// Up to [`READ_AT_ONCE`] announced events to read, and the epoch their read starts in.
    fn take_announced(&self) -> (Vec<Uuid>, u64) {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<Uuid> = announced.iter().take(READ_AT_ONCE).copied().collect();
        for id in &ids {
            announced.remove(id);
        }
        (ids, self.epoch.load(Ordering::Acquire))
    }

    /// Keeps what [`Self::keep_warm`] read, but not an event announced again meanwhile (it is
    /// read again), nor anything if notifications stopped or restarted meanwhile, nor more
    /// than [`KEPT`] events, nor an event that has started.
    fn keep_announced(&self, epoch: u64, read: Vec<EventForSale>) {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        if self.epoch.load(Ordering::Acquire) != epoch || !self.synced.load(Ordering::Acquire) {
            return;
        }
        let announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        for event in read {
            if events.len() >= KEPT {
                break;
            }
            if event.on_sale(now) && !announced.contains(&event.id) {
                events.insert(event.id, event);
            }
        }
        record_size(&events);
    }
}

/// `turnstile_catalog_events`, after any change to the catalog's events.
fn record_size(events: &HashMap<Uuid, EventForSale>) {
    metrics::gauge!("turnstile_catalog_events").set(events.len() as f64);
}

/// The live event, read from the database in one statement with its types and codes.
pub async fn read(db: impl sqlx::PgExecutor<'_>, id: Uuid) -> Result<Option<EventForSale>, sqlx::Error> {
    Ok(read_many(db, &[id]).await?.pop())
}

/// The live ones of these events (in no particular order), each with its types and codes, in
/// one statement.
pub async fn read_many(db: impl sqlx::PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<EventForSale>, sqlx::Error> {
    sqlx::query_as!(
        EventForSale,
        r#"SELECT e.id, e.name, e.starts_at, e.sales_start, e.prequeue_opens_at, e.currency, e.max_per_order, e.max_per_buyer, e.default_ticket_type_id,
                coalesce((SELECT json_agg(json_build_object(
                              'id', t.id, 'name', t.name, 'price', t.price::text,
                              'max_per_order', t.max_per_order, 'max_per_buyer', t.max_per_buyer,
                              'sales_start', t.sales_start, 'sales_end', t.sales_end,
                              'requires_promo_code', t.requires_promo_code)
                              ORDER BY t.sort_order, t.id)
                          FROM ticket_types t WHERE t.event_id = e.id AND t.deleted_at IS NULL), '[]')
                    AS "types!: sqlx::types::Json<Vec<TypeForSale>>",
                coalesce((SELECT json_agg(json_build_object(
                              'id', c.id, 'code', c.code, 'percent_off', c.percent_off::text,
                              'amount_off', c.amount_off::text, 'ticket_type_ids', c.ticket_type_ids,
                              'valid_from', c.valid_from, 'valid_until', c.valid_until))
                          FROM promo_codes c WHERE c.event_id = e.id AND c.withdrawn_at IS NULL), '[]')
                    AS "codes!: sqlx::types::Json<Vec<CodeForSale>>"
         FROM events e WHERE e.id = ANY($1) AND e.deleted_at IS NULL"#,
        ids
    )
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Uuid, starts_in: chrono::Duration) -> EventForSale {
        EventForSale {
            id,
            name: "Concert".to_owned(),
            starts_at: Utc::now() + starts_in,
            sales_start: None,
            prequeue_opens_at: None,
            currency: "EUR".to_owned(),
            max_per_order: 4,
            max_per_buyer: None,
            default_ticket_type_id: None,
            types: sqlx::types::Json(vec![]),
            codes: sqlx::types::Json(vec![]),
        }
    }

    /// An event that starts tomorrow.
    fn upcoming(id: Uuid) -> EventForSale {
        event(id, chrono::Duration::days(1))
    }

    fn synced_catalog() -> EventCatalog {
        let catalog = EventCatalog::default();
        catalog.synced();
        catalog
    }

    #[test]
    fn announced_events_are_kept_once_read() {
        let catalog = synced_catalog();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        catalog.forget(a);
        catalog.forget(b);
        let (mut ids, epoch) = catalog.take_announced();
        ids.sort();
        assert_eq!(ids, vec![a, b]);
        assert!(catalog.take_announced().0.is_empty(), "each announcement is read once");
        catalog.keep_announced(epoch, vec![upcoming(a), upcoming(b)]);
        assert_eq!(catalog.kept(a).map(|e| e.id), Some(a));
        assert_eq!(catalog.kept(b).map(|e| e.id), Some(b));
    }

    #[test]
    fn an_event_announced_again_while_it_was_read_is_read_again() {
        let catalog = synced_catalog();
        let (changed, unchanged) = (Uuid::now_v7(), Uuid::now_v7());
        catalog.forget(changed);
        catalog.forget(unchanged);
        let (_, epoch) = catalog.take_announced();
        // A change commits while the read is under way: what was read may predate it.
        catalog.forget(changed);
        catalog.keep_announced(epoch, vec![upcoming(changed), upcoming(unchanged)]);
        assert!(catalog.kept(changed).is_none(), "the read may predate the change");
        assert!(catalog.kept(unchanged).is_some());
        assert_eq!(catalog.take_announced().0, vec![changed], "read again");
    }

    #[test]
    fn a_read_from_before_the_listener_reconnected_is_not_kept() {
        let catalog = synced_catalog();
        let id = Uuid::now_v7();
        catalog.forget(id);
        let (_, epoch) = catalog.take_announced();
        catalog.lost();
        catalog.keep_announced(epoch, vec![upcoming(id)]);
        assert!(catalog.kept(id).is_none(), "nothing is kept while notifications are not received");
        catalog.synced();
        catalog.keep_announced(epoch, vec![upcoming(id)]);
        assert!(catalog.kept(id).is_none(), "changes while the listener was away were not announced");
        catalog.forget(id);
        let (_, epoch) = catalog.take_announced();
        catalog.keep_announced(epoch, vec![upcoming(id)]);
        assert!(catalog.kept(id).is_some());
    }

    #[test]
    fn a_reconnected_listener_reads_again_what_was_kept_and_started_events_are_not_kept() {
        let catalog = synced_catalog();
        let (kept, started) = (Uuid::now_v7(), Uuid::now_v7());
        catalog.forget(kept);
        catalog.forget(started);
        let (_, epoch) = catalog.take_announced();
        catalog.keep_announced(epoch, vec![upcoming(kept), event(started, -chrono::Duration::minutes(1))]);
        assert!(catalog.kept(started).is_none(), "an event that has started sells nothing");
        catalog.lost();
        catalog.synced();
        assert!(catalog.kept(kept).is_none(), "dropped at the reconnection");
        assert_eq!(catalog.take_announced().0, vec![kept], "and read again");
    }
}
