//! The api's one `LISTEN` connection: order changes wake long-polls (`OrderWatch`), token
//! revocations keep `Revocations` current, event changes drop events from the
//! `EventCatalog` (which reads them again). A lost connection is reconnected after a second;
//! meanwhile long-polls fall back on their once-a-second re-read, and token checks and event
//! lookups read the database, so a missed notification only delays a wake-up and never lets
//! a revoked token in or keeps a stale event.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::purchase::catalog::{self, EventCatalog};
use crate::purchase::order_watch::OrderWatch;
use crate::revocations::{self, Revocations};

/// Who is told what.
pub struct Listened {
    pub orders: Arc<OrderWatch>,
    pub revocations: Arc<Revocations>,
    pub catalog: Arc<EventCatalog>,
}

/// Listens until shutdown, reconnecting after errors; stops on one that no reconnection
/// can fix (the database refuses the credentials or is gone: [`common::db::is_permanent`]),
/// which stops the process.
pub async fn listen(db: PgPool, listened: Listened, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Listened { orders, revocations, catalog } = listened;
    while !shutdown.is_cancelled() {
        let result = async {
            let mut listener = PgListener::connect_with(&db).await?;
            listener.listen_all([common::db::ORDER_CHANGES_CHANNEL, revocations::CHANNEL, catalog::CHANNEL]).await?;
            // Read after LISTEN: whatever commits from now on is announced to us.
            revocations.reload(&db).await?;
            catalog.synced();
            loop {
                let notification = tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<_, sqlx::Error>(()),
                    notification = listener.try_recv() => notification?,
                };
                // `None`: the connection was lost (and notifications with it); start over.
                let Some(notification) = notification else {
                    return Err(sqlx::Error::Protocol("the LISTEN connection was lost".into()));
                };
                if notification.channel() == revocations::CHANNEL {
                    revocations.record_announced(notification.payload());
                } else if notification.channel() == catalog::CHANNEL {
                    catalog.forget_announced(notification.payload());
                } else {
                    for id in notification.payload().split(',').filter_map(|id| id.parse().ok()) {
                        orders.wake(id);
                    }
                }
            }
        }
        .await;
        if let Err(err) = result {
            revocations.lost();
            catalog.lost();
            if common::db::is_permanent(&err) {
                return Err(err.into());
            }
            tracing::warn!(error = %err, "notification listener failed; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    Ok(())
}
