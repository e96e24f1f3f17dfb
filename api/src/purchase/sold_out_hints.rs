//! How many tickets recently read events had left, so that the sold-out fast path refuses a
//! stampede on a sold-out event without a database read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Tickets left per event as last read from the database, trusted for a short time. A
/// hint, never the authority: it may only refuse (`409 sold_out`) what the database very
/// recently said could not be sold; everything else is read afresh and decided by the worker.
pub struct SoldOutHints {
    ttl: Duration,
    seen: Mutex<HashMap<Uuid, Hint>>,
}

#[derive(Clone, Copy)]
pub struct Hint {
    pub available: i32,
    read_at: Instant,
}

/// Above this many remembered events, stale hints are dropped.
const HINTS_KEPT: usize = 10_000;

impl SoldOutHints {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, seen: Mutex::default() }
    }

    /// The event's hint, if it was read within the time to trust it.
    pub fn get(&self, event_id: Uuid) -> Option<Hint> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(&event_id).copied().filter(|hint| hint.read_at.elapsed() < self.ttl)
    }

    pub fn record(&self, event_id: Uuid, available: i32) {
        if self.ttl.is_zero() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= HINTS_KEPT {
            seen.retain(|_, hint| hint.read_at.elapsed() < self.ttl);
        }
        seen.insert(event_id, Hint { available, read_at: Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_trusted_for_their_time_only() {
        let event = Uuid::from_u128(7);
        let hints = SoldOutHints::new(Duration::from_millis(50));
        assert!(hints.get(event).is_none());
        hints.record(event, 0);
        assert_eq!(hints.get(event).map(|h| h.available), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert!(hints.get(event).is_none(), "stale");
        let off = SoldOutHints::new(Duration::ZERO);
        off.record(event, 0);
        assert!(off.get(event).is_none(), "a zero time keeps nothing");
    }
}
