//! The HTTP server's connections, bounded: `axum::serve` sets no header-read timeout and no
//! limit on connections, so slow headers and idle keep-alive connections could be held
//! until the process ran out of file descriptors and stopped answering anyone.
//!
//! - **Header timeout** (`HTTP_HEADER_TIMEOUT_SECS`): hyper's header-read timeout, which
//!   starts when a connection waits for a request (after it opened, or after the previous
//!   response): a client that does not send a whole request head in time, slowly or not at
//!   all, is disconnected.
//! - **Connection limit** (`HTTP_MAX_CONNECTIONS`): at the limit, a new connection closes the
//!   connection idle the longest, as nginx reuses its keep-alive connections: one with no
//!   request in flight (waiting for a request, or still receiving its head). Only when every
//!   connection has a request in flight is the new one closed at once. So a flood of idle or
//!   slow connections costs at most the limit in descriptors, and a client that sends a
//!   request is still answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How the server treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown`, then lets the connections finish their
/// requests (as `axum::serve`'s graceful shutdown does).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let connections = Arc::new(Connections::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or the like: wait a moment instead of spinning.
                    tracing::error!(error = %err, "accept error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(connection) = connections.admit() else {
            metrics::counter!("turnstile_http_connections_closed_total", "reason" => "limit").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = {
            let (app, connection) = (app.clone(), connection.clone());
            tower::service_fn(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let busy = connection.busy();
                let app = app.clone();
                async move {
                    let response = app.oneshot(request).await;
                    drop(busy);
                    response
                }
            })
        };
        let serving = graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
        let connections = connections.clone();
        tokio::spawn(async move {
            tokio::select! {
                // Dropping the connection closes it.
                () = connection.evicted.cancelled() => {}
                result = serving => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                }
            }
            connections.remove(connection.id);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One open connection.
struct Connection {
    id: u64,
    /// Requests in flight on it.
    in_flight: AtomicUsize,
    /// When it was last busy, in [`Connections::clock`] ticks: its accept or its last
    /// response.
    last_active: AtomicU64,
    clock: Arc<AtomicU64>,
    /// Cancelled to close it.
    evicted: CancellationToken,
}

impl Connection {
    /// Marks a request in flight until the guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

struct Busy(Arc<Connection>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_active.store(self.0.clock.fetch_add(1, Ordering::AcqRel), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections, at most `max`.
struct Connections {
    max: usize,
    /// Ticks once per accept and per response: orders connections by their last activity.
    clock: Arc<AtomicU64>,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl Connections {
    fn new(max: usize) -> Self {
        Self { max: max.max(1), clock: Arc::new(AtomicU64::new(0)), open: Mutex::new(HashMap::new()) }
    }

    /// Room for one more connection: at the limit, by closing the one idle the longest;
    /// `None` when every connection has a request in flight.
    fn admit(&self) -> Option<Arc<Connection>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let idlest = open
                .values()
                .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|c| c.last_active.load(Ordering::Acquire))
                .map(|c| c.id)?;
            if let Some(evicted) = open.remove(&idlest) {
                evicted.evicted.cancel();
                metrics::counter!("turnstile_http_connections_closed_total", "reason" => "idle_at_limit").increment(1);
            }
        }
        let tick = self.clock.fetch_add(1, Ordering::AcqRel);
        let connection = Arc::new(Connection {
            id: tick,
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(tick),
            clock: self.clock.clone(),
            evicted: CancellationToken::new(),
        });
        open.insert(tick, connection.clone());
        metrics::gauge!("turnstile_http_connections").set(open.len() as f64);
        Some(connection)
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&id);
        metrics::gauge!("turnstile_http_connections").set(open.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_idlest_connection_makes_room() {
        let connections = Connections::new(3);
        let first = connections.admit().unwrap();
        let second = connections.admit().unwrap();
        let third = connections.admit().unwrap();
        // The first is busy, then the second finishes a request: the third is now the idlest.
        let _busy = first.busy();
        drop(second.busy());
        let fourth = connections.admit().unwrap();
        assert!(third.evicted.is_cancelled());
        assert!(!first.evicted.is_cancelled() && !second.evicted.is_cancelled());
        // Everyone busy: no room.
        let (_b2, _b4) = (second.busy(), fourth.busy());
        assert!(connections.admit().is_none());
        assert_eq!(connections.open.lock().unwrap().len(), 3);
    }
}
