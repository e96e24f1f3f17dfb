//! Wakes long-polling `GET /orders/{id}?wait=N` requests when PostgreSQL announces
//! (`NOTIFY order_changes`, see `listener`) that their order changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

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

    pub fn wake(&self, order_id: Uuid) {
        if let Some(notify) = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).get(&order_id) {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
