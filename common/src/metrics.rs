//! Prometheus metrics: the recorder both processes install (histograms with explicit
//! buckets, no summaries), the build-info gauge, the database pool gauges, and the small
//! HTTP server that serves `/metrics` on `METRICS_ADDR`, apart from the public API.
//!
//! Names follow OpenTelemetry's semantic conventions where one exists
//! (`http_server_request_duration_seconds`, `db_client_connections_usage`); Turnstile's own
//! are prefixed `turnstile_`. Counters with a fixed set of labels are registered at zero at
//! start, so that rates and alerts work before the first event. The README's Observability
//! section lists every metric.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Seconds: from 1 ms (an accept under no load) to 60 s (a webhook timing out, a backlog).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Orders per batch: from one (a quiet day) to a stampede's thousands.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

/// The git commit this binary was built from (`TURNSTILE_GIT_COMMIT` at build time, else
/// `git rev-parse`; `unknown` outside a checkout).
pub const GIT_COMMIT: &str = env!("TURNSTILE_GIT_COMMIT");

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder and sets `turnstile_build_info`. Every histogram
/// whose name ends in `_seconds` gets [`LATENCY_BUCKETS`], every one ending in `_orders`
/// gets [`BATCH_BUCKETS`]. Run [`upkeep`] beside it.
///
/// One recorder serves the process: a second call (an api and a worker built in one test
/// process, or an api built again) returns the first one's handle.
pub fn install(service: &'static str) -> anyhow::Result<PrometheusHandle> {
    static INSTALLED: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_orders".into()), BATCH_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    *installed = Some(handle.clone());
    describe_common();
    metrics::gauge!(
        "turnstile_build_info",
        "service" => service,
        "version" => env!("CARGO_PKG_VERSION"),
        "git_commit" => GIT_COMMIT,
    )
    .set(1.0);
    Ok(handle)
}

fn describe_common() {
    metrics::describe_gauge!(
        "turnstile_build_info",
        "Always 1; the labels say which build runs (service, version, git_commit)."
    );
    metrics::describe_gauge!(
        "db_client_connections_usage",
        "Database connections of this process's pool, by state (idle, used)."
    );
    metrics::describe_gauge!("db_client_connections_max", "The most connections this process's pool opens.");
    metrics::describe_counter!(
        "turnstile_purchase_publishes_total",
        "Purchase messages sent to the broker, by outcome (confirmed, nacked, timeout, unroutable, unavailable)."
    );
    for outcome in ["confirmed", "nacked", "timeout", "unroutable", "unavailable"] {
        metrics::counter!("turnstile_purchase_publishes_total", "outcome" => outcome).increment(0);
    }
}

/// Sets the pool gauges from the pool's state now (called on every scrape).
pub fn record_pool(pool: &sqlx::PgPool) {
    let size = pool.size();
    let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
    metrics::gauge!("db_client_connections_usage", "state" => "idle").set(f64::from(idle));
    metrics::gauge!("db_client_connections_usage", "state" => "used").set(f64::from(size - idle));
    metrics::gauge!("db_client_connections_max").set(f64::from(pool.options().get_max_connections()));
}

/// A router answering `GET /metrics` with the exposition, after `before_scrape` has brought
/// the gauges read on demand up to date.
pub fn router<F, Fut>(handle: PrometheusHandle, before_scrape: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    Router::new().route(
        "/metrics",
        get(move || {
            let (handle, before_scrape) = (handle.clone(), before_scrape.clone());
            async move {
                before_scrape().await;
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
            }
        }),
    )
}

/// The recorder's upkeep until `shutdown`: folds the samples recorded since into the
/// buckets every few seconds, so that memory stays bounded whether or not anyone scrapes.
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    while shutdown.run_until_cancelled(every.tick()).await.is_some() {
        handle.run_upkeep();
    }
}

/// Binds `addr` (failing at start-up when it is taken) and logs the address bound (`metrics
/// listening`, field `addr`); the returned future serves `router` there until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>> + Send + 'static> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding METRICS_ADDR {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    Ok(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("serving the metrics")
    })
}

/// Runs `work` at most for `limit`; for gauges read on a scrape, which must not hang it.
pub async fn bounded<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, work).await.ok()
}
