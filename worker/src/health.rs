//! The worker's HTTP server on `METRICS_ADDR`: Prometheus `/metrics`, and liveness and
//! readiness probes for orchestrators (`/health/live`, `/health/ready`), since the worker
//! serves no API of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use common::supervise::Failed;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use sqlx::PgPool;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes and the scrape read.
#[derive(Clone)]
pub struct Probe {
    pub db: PgPool,
    pub partitions: u16,
    /// Partition queues this worker's consumers are subscribed to right now.
    pub subscribed: Arc<AtomicUsize>,
    /// Set once a supervised task has stopped (the process is on its way out).
    pub failed: Failed,
}

impl Probe {
    pub fn new(db: PgPool, partitions: u16, failed: Failed) -> Self {
        Self { db, partitions, subscribed: Arc::default(), failed }
    }

    /// A partition consumer subscribed; the returned guard counts it until dropped.
    pub fn subscribed(&self) -> Subscribed {
        self.subscribed.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("turnstile_partitions_subscribed").increment(1.0);
        Subscribed(self.subscribed.clone())
    }

    /// Gauges read on demand, brought up to date before each scrape.
    async fn before_scrape(&self) {
        common::metrics::record_pool(&self.db);
        let pending =
            sqlx::query_scalar!(r#"SELECT count(*) AS "pending!" FROM webhook_deliveries WHERE status = 'PENDING'"#)
                .fetch_one(&self.db);
        if let Some(Ok(pending)) = common::metrics::bounded(CHECK_TIMEOUT, pending).await {
            metrics::gauge!("turnstile_webhook_deliveries_pending").set(pending as f64);
        }
    }
}

/// One subscribed partition consumer, counted while it lives.
pub struct Subscribed(Arc<AtomicUsize>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("turnstile_partitions_subscribed").decrement(1.0);
    }
}

pub fn router(probe: Probe, metrics: PrometheusHandle) -> Router {
    let scraped = probe.clone();
    let scrape = move || {
        let probe = scraped.clone();
        async move { probe.before_scrape().await }
    };
    Router::new()
        .route("/health/live", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(ready))
        .with_state(probe)
        .merge(common::metrics::router(metrics, scrape))
}

/// Ready: PostgreSQL answers, a consumer is subscribed to every partition queue (with
/// several workers, each subscribes to all; RabbitMQ delivers each partition to one), and
/// every supervised task is running.
async fn ready(State(probe): State<Probe>) -> (StatusCode, Json<Value>) {
    let database = common::db::answers(&probe.db, CHECK_TIMEOUT).await;
    let subscribed = probe.subscribed.load(Ordering::Relaxed);
    let consuming = subscribed >= usize::from(probe.partitions);
    let stopped = probe.failed.task();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let ok = database && consuming && stopped.is_none();
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "checks": {
            "database": word(database),
            "broker": word(consuming),
            "partitions_subscribed": subscribed,
            "partitions": probe.partitions,
            "tasks": word(stopped.is_none()),
            "stopped_task": stopped,
        },
    });
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
