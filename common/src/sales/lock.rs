//! The event lock: what every change to an event's stock and its orders' statuses holds.

use sqlx::PgConnection;
use uuid::Uuid;

/// An event row as its lock read it: what does not change while the lock is held unless
/// its holder changes it. (What is left is read by [`stock::load`](super::stock::load),
/// which sees the transaction's own changes.)
#[derive(Clone, Debug)]
pub struct LockedEvent {
    pub id: Uuid,
    pub deleted: bool,
    /// Being deleted with refunds (`refunding_since`), not finished yet.
    pub refunding: bool,
    pub currency: String,
    /// It has (or had) a pre-sale queue: its drawn entries are decided first.
    pub presale: bool,
}

/// Proof that the transaction on this connection holds these events' row locks (`FOR NO
/// KEY UPDATE`, taken in id order). Only [`lock_event`] and [`lock_events`] make one, and
/// every function that changes what an event has sold, or the status of its orders, takes
/// one. It borrows the transaction's connection, so it cannot outlive the transaction nor
/// be used on another; run other statements of the transaction through [`EventLock::conn`].
///
/// Writers exclude each other while readers and inserts (the api storing `QUEUED` orders)
/// go on. Every writer locks the event row first and the order rows after it, so two such
/// transactions can only queue behind each other, never deadlock.
pub struct EventLock<'c> {
    conn: &'c mut PgConnection,
    events: Vec<LockedEvent>,
}

impl std::fmt::Debug for EventLock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLock").field("events", &self.events).finish_non_exhaustive()
    }
}

impl<'c> EventLock<'c> {
    /// The transaction the locks belong to.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// One of the locked events, as the lock read it.
    pub fn event(&self, event_id: Uuid) -> Option<&LockedEvent> {
        self.events.binary_search_by_key(&event_id, |e| e.id).ok().map(|i| &self.events[i])
    }

    /// The locked events, in id order.
    pub fn events(&self) -> &[LockedEvent] {
        &self.events
    }

    /// The ids of the locked events, in id order.
    pub fn ids(&self) -> Vec<Uuid> {
        self.events.iter().map(|e| e.id).collect()
    }

    /// Refuses (as a protocol error, which is a bug) a write for an event this lock does not hold.
    pub(crate) fn check_holds(&self, event_id: Uuid) -> sqlx::Result<()> {
        if self.event(event_id).is_some() {
            Ok(())
        } else {
            Err(sqlx::Error::Protocol(format!("event {event_id} is changed without its lock")))
        }
    }
}

/// Locks one event's row, deleted or not; `None` when there is no such event.
pub async fn lock_event(conn: &mut PgConnection, event_id: Uuid) -> sqlx::Result<Option<EventLock<'_>>> {
    let lock = lock_events(conn, &[event_id]).await?;
    Ok((!lock.events.is_empty()).then_some(lock))
}

/// Locks one event's row if it exists and is not deleted; `None` otherwise.
pub async fn lock_live_event(conn: &mut PgConnection, event_id: Uuid) -> sqlx::Result<Option<EventLock<'_>>> {
    Ok(lock_event(conn, event_id).await?.filter(|lock| lock.events.iter().all(|e| !e.deleted)))
}

/// Locks these events' rows, in id order, whatever order they are given in (so two
/// transactions locking overlapping sets cannot deadlock). Events that do not exist are
/// absent from the lock.
pub async fn lock_events<'c>(conn: &'c mut PgConnection, event_ids: &[Uuid]) -> sqlx::Result<EventLock<'c>> {
    let mut ids = event_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let events = sqlx::query_as!(
        LockedEvent,
        r#"SELECT id, deleted_at IS NOT NULL AS "deleted!", refunding_since IS NOT NULL AS "refunding!", currency,
                  prequeue_opens_at IS NOT NULL AS "presale!"
           FROM events WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"#,
        &ids
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(EventLock { conn, events })
}
