//! Turnstile's HTTP API as a library: [`Application`] builds the server from an
//! [`ApiConfig`] and runs it until its shutdown token is cancelled; [`cli`] holds the `api`
//! binary's subcommands. The binary (`main.rs`) only parses the command line and calls
//! [`cli::run`]; the tests build an [`Application`] in their own process.

// Functions stay under 80 lines (clippy.toml) outside tests.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

mod auth;
pub mod cli;
mod error;
pub use error::USER_REFERENCES;
mod extract;
mod listener;
mod observability;
mod openapi;
mod purchase;
mod revocations;
mod routes;
mod serve;
mod state;
mod throttle;
mod ticket_codes;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use common::amqp::Publisher;
use common::config::ApiConfig;
use common::standard_webhooks::SigningKey;
use common::supervise::Tasks;
use tokio_util::sync::CancellationToken;

use crate::auth::{HeavyWork, Tokens};
use crate::purchase::order_watch::OrderWatch;
use crate::purchase::{catalog, order_inserter, sold_out_hints};
use crate::state::AppState;
use crate::throttle::Throttle;
use crate::ticket_codes::TicketCodes;

/// How long start-up waits to open the purchase channel before it serves without it.
const WARM_UP: std::time::Duration = std::time::Duration::from_secs(3);

/// The api, built: listening, its tasks started. [`Application::run_until_stopped`] waits
/// for them.
pub struct Application {
    addr: SocketAddr,
    tasks: Tasks,
    db: sqlx::PgPool,
    amqp: common::amqp::Pool,
}

impl Application {
    /// Connects, migrates, binds `config.bind_addr` and the metrics address, and starts every
    /// task. Cancelling `shutdown` stops them as SIGTERM does.
    pub async fn build(config: ApiConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        config.validate()?;
        let metrics = common::metrics::install("api")?;
        observability::describe();
        let db = common::db::connect(&config.database).await.context("connecting to PostgreSQL")?;
        common::db::migrate(&db).await.context("applying migrations")?;
        let amqp = common::amqp::pool(&config.broker, 4).context("creating the AMQP pool")?;
        let listener = tokio::net::TcpListener::bind(config.bind_addr)
            .await
            .with_context(|| format!("binding {}", config.bind_addr))?;
        let addr = listener.local_addr()?;
        let mut tasks = Tasks::new(shutdown.clone());
        let scraped_pool = db.clone();
        let scrape = move || {
            let pool = scraped_pool.clone();
            async move { common::metrics::record_pool(&pool) }
        };
        tasks.spawn("metrics upkeep", common::metrics::upkeep(metrics.clone(), shutdown.clone()));
        let serving =
            common::metrics::serve(config.metrics_addr, common::metrics::router(metrics, scrape), shutdown.clone())
                .await?;
        tasks.spawn("metrics server", serving);
        // Ready before the first buyer: the pool's first connections are open (`connect`)
        // and have run the purchase path's statements, and the purchase channel is open. A
        // broker that does not answer yet is no reason not to start (orders wait in the
        // database for the re-publisher).
        let inserters = purchase::warm_up(&db, order_inserter::Settings::of(&config))
            .await
            .context("running the purchase statements once")?;
        let state = app_state(config, db.clone(), amqp.clone(), inserters, &mut tasks, &shutdown)?;
        match tokio::time::timeout(WARM_UP, state.publisher.open()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "purchase channel not opened at start-up"),
            Err(_) => tracing::warn!("purchase channel not opened at start-up within {WARM_UP:?}"),
        }
        tracing::info!(%addr, docs = %format!("http://{addr}/docs"), "listening");
        let limits = serve::ConnectionLimits {
            header_timeout: state.config.http_header_timeout(),
            max_connections: usize::try_from(state.config.http_max_connections).unwrap_or(usize::MAX),
        };
        let app = routes::app(state);
        tasks.spawn("http server", async move {
            serve::serve(listener, app, limits, shutdown).await.context("serving HTTP")
        });
        Ok(Self { addr, tasks, db, amqp })
    }

    /// Where the HTTP server listens (the port chosen, for `BIND_ADDR` port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until every task has stopped (after the shutdown token, or a task that ended
    /// early: then the error names it), and closes the connections.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let supervised = self.tasks.supervise().await;
        self.amqp.close();
        self.db.close().await;
        tracing::info!("api stopped");
        supervised
    }
}

/// The state the handlers share, with the background tasks it needs started in `tasks`.
fn app_state(
    config: ApiConfig,
    db: sqlx::PgPool,
    amqp: common::amqp::Pool,
    inserters: sqlx::pool::PoolConnection<sqlx::Postgres>,
    tasks: &mut Tasks,
    shutdown: &CancellationToken,
) -> anyhow::Result<AppState> {
    let webhook_key = SigningKey::new(common::config::webhook_key(&config.webhook_secret)?);
    let tokens = Tokens::new(config.jwt_secret.expose().as_bytes(), &config.jwt_issuer, config.jwt_ttl());
    let order_watch = Arc::new(OrderWatch::default());
    let revocations = Arc::new(revocations::Revocations::default());
    let catalog = Arc::new(catalog::EventCatalog::default());
    let listened =
        listener::Listened { orders: order_watch.clone(), revocations: revocations.clone(), catalog: catalog.clone() };
    tasks.spawn("notification listener", listener::listen(db.clone(), listened, shutdown.clone()));
    tasks.spawn("event catalog", catalog.clone().keep_warm(db.clone(), shutdown.clone()));
    let mut throttle = |name: &'static str, per_minute: u32| {
        let throttle = Arc::new(Throttle::per_minute(name, NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN)));
        tasks.spawn(format!("{name} rate-limit clean-up"), throttle.clone().clean_up(db.clone(), shutdown.clone()));
        throttle
    };
    let (login_throttle, login_address_throttle, signup_throttle) = (
        throttle("login_account", config.login_attempts_per_minute),
        throttle("login_address", config.login_attempts_per_address_per_minute),
        throttle("signup", config.signup_per_minute),
    );
    let heavy_work = match config.password_hash_concurrency {
        0 => HeavyWork::per_core(),
        slots => HeavyWork::new(usize::from(slots)),
    };
    let publisher = Arc::new(Publisher::new(amqp.clone(), config.broker.partitions));
    // The inserter's task ends once the HTTP server (which holds the inserter) has.
    let settings = order_inserter::Settings::of(&config);
    let (orders, inserter) = order_inserter::OrderInserter::new(db.clone(), inserters, publisher.clone(), settings);
    tasks.spawn("order inserter", inserter);
    Ok(AppState {
        db,
        amqp,
        orders,
        publisher,
        catalog,
        sold_out: Arc::new(sold_out_hints::SoldOutHints::new(config.sold_out_hint())),
        order_watch,
        tokens: Arc::new(tokens),
        revocations,
        heavy_work: Arc::new(heavy_work),
        login_throttle,
        login_address_throttle,
        signup_throttle,
        webhook_key: Arc::new(webhook_key),
        ticket_codes: Arc::new(TicketCodes::new(config.ticket_secret.expose().as_bytes())),
        images: image_store(&config.image_store).context("opening the image store")?,
        tasks_failed: tasks.failed(),
        config: Arc::new(config),
    })
}

/// `IMAGE_STORE`: `s3://bucket[/prefix]` (credentials and endpoint from the `AWS_*`
/// variables), or a local directory, created if missing.
fn image_store(location: &str) -> anyhow::Result<Arc<dyn object_store::ObjectStore>> {
    if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build()?;
        return Ok(match prefix.trim_matches('/') {
            "" => Arc::new(s3),
            prefix => Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
        });
    }
    std::fs::create_dir_all(location).with_context(|| format!("creating {location}"))?;
    Ok(Arc::new(object_store::local::LocalFileSystem::new_with_prefix(location)?))
}
