//! The api's background helpers for the purchase pipeline:
//!
//! - [`spawn_publish_marker`]: stamps `published_at` on orders whose message the broker
//!   confirmed, in bulk and off the request path, so the worker's re-publisher only touches
//!   orders that may really be missing from the queue.
//! - [`OrderWatch`]: wakes long-polling `GET /orders/{id}?wait=N` requests when PostgreSQL
//!   announces (`NOTIFY order_changes`) that their order changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Confirmed order ids waiting to be stamped. When full, ids are dropped: the order is then
/// published once more by the re-publisher, which is harmless.
const MARKER_BACKLOG: usize = 100_000;
const MARKER_BATCH: usize = 2_000;

pub fn spawn_publish_marker(db: PgPool) -> mpsc::Sender<Uuid> {
    let (tx, mut rx) = mpsc::channel::<Uuid>(MARKER_BACKLOG);
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(MARKER_BATCH);
        // Ids pile up while one UPDATE runs; the next takes them all at once.
        while rx.recv_many(&mut ids, MARKER_BATCH).await > 0 {
            if let Err(err) = common::db::mark_published(&db, &ids).await {
                tracing::warn!(error = %err, orders = ids.len(), "could not record confirmed publishes");
            }
            ids.clear();
        }
    });
    tx
}

/// Long-poll waiters by order id.
#[derive(Default)]
pub struct OrderWatch {
    waiters: Mutex<HashMap<Uuid, Arc<Notify>>>,
}

/// One request's interest in one order; unregisters itself when dropped.
pub struct Waiter {
    watch: Arc<OrderWatch>,
    order_id: Uuid,
    notify: Arc<Notify>,
}

impl Waiter {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.watch.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // The map holds one reference and this waiter another: no one else is waiting.
        if Arc::strong_count(&self.notify) <= 2 {
            waiters.remove(&self.order_id);
        }
    }
}

impl OrderWatch {
    pub fn watch(self: &Arc<Self>, order_id: Uuid) -> Waiter {
        let notify = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).entry(order_id).or_default().clone();
        Waiter { watch: self.clone(), order_id, notify }
    }

    fn wake(&self, order_id: Uuid) {
        if let Some(notify) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).get(&order_id) {
            notify.notify_waiters();
        }
    }

    /// Listens for order changes until shutdown, reconnecting after errors. Waiters also
    /// re-read the database every second, so a lost notification only delays them.
    pub async fn listen(self: Arc<Self>, db: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let result = async {
                let mut listener = PgListener::connect_with(&db).await?;
                listener.listen(common::db::ORDER_CHANGES_CHANNEL).await?;
                loop {
                    let notification = tokio::select! {
                        _ = shutdown.cancelled() => return Ok::<_, sqlx::Error>(()),
                        notification = listener.recv() => notification?,
                    };
                    for id in notification.payload().split(',').filter_map(|id| id.parse().ok()) {
                        self.wake(id);
                    }
                }
            }
            .await;
            if let Err(err) = result {
                tracing::warn!(error = %err, "order change listener failed; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_waiters_of_that_order_only() {
        let watch = Arc::new(OrderWatch::default());
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let waiter = watch.watch(a);
        let other = watch.watch(b);
        let notified = waiter.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let unrelated = other.notify().notified();
        tokio::pin!(unrelated);
        unrelated.as_mut().enable();
        watch.wake(a);
        tokio::time::timeout(Duration::from_millis(100), notified).await.expect("waiter woken");
        assert!(tokio::time::timeout(Duration::from_millis(50), unrelated).await.is_err());
    }

    #[test]
    fn dropped_waiters_unregister() {
        let watch = Arc::new(OrderWatch::default());
        let id = Uuid::from_u128(1);
        let first = watch.watch(id);
        let second = watch.watch(id);
        drop(first);
        assert_eq!(watch.waiters.lock().unwrap().len(), 1, "second still waits");
        drop(second);
        assert!(watch.waiters.lock().unwrap().is_empty());
    }
}
