//! `api`: Turnstile's HTTP server, plus the operator's subcommands (`migrate`,
//! `create-admin`, `sign-webhook`).

// Functions stay under 80 lines (clippy.toml) outside tests.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

mod auth;
mod catalog;
mod error;
mod extract;
mod listener;
mod observability;
mod openapi;
mod pipeline;
mod revocations;
mod routes;
mod state;
mod throttle;
mod ticket_codes;

use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use common::amqp::Publisher;
use common::config::{ApiConfig, DatabaseConfig, Secret};
use common::domain::{Password, Role, UserName};
use common::standard_webhooks::SigningKey;
use common::supervise::Tasks;

use crate::auth::{HeavyWork, Tokens};
use crate::pipeline::OrderWatch;
use crate::state::AppState;
use crate::throttle::Throttle;
use crate::ticket_codes::TicketCodes;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "api",
    version,
    about = "Turnstile HTTP API. Configuration comes from flags or the environment \
                                          (a .env file in the working directory is read too)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations, then exit.
    Migrate(MigrateArgs),
    /// Create an admin account, or give the admin role to an existing one.
    CreateAdmin(CreateAdminArgs),
    /// Print the Standard Webhooks headers that sign a payment webhook body, as the payment
    /// provider would send them (for testing by hand: `curl -H @file`).
    SignWebhook(SignWebhookArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ApiConfig,
}

/// For `api` with no subcommand: the same flags as `api serve`.
#[derive(Parser)]
#[command(name = "api")]
struct ServeCli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

#[derive(Args)]
struct CreateAdminArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[arg(long)]
    email: String,
    /// Display name (defaults to the part of the email before '@').
    #[arg(long)]
    name: Option<String>,
    /// Password (8 to 128 characters). Without it, read from ADMIN_PASSWORD or one line of
    /// standard input, which keeps it out of shell history.
    #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

#[derive(Args)]
struct SignWebhookArgs {
    /// The key to sign with, as the api's WEBHOOK_SECRET (raw, or `whsec_<base64>`).
    #[arg(long = "webhook-secret", env = "WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Secret,
    /// The exact request body to sign, e.g. '{"status":"PAID","order_id":"…"}'.
    #[arg(long)]
    body: String,
    /// The message id (`webhook-id`); a new random one by default.
    #[arg(long)]
    id: Option<String>,
    /// Unix seconds (`webhook-timestamp`); now by default.
    #[arg(long)]
    timestamp: Option<i64>,
}

fn main() -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let telemetry = common::telemetry::init("api");
    let code = common::run_main(run(cli));
    drop(telemetry);
    code
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Serve(args)) => serve(args.config).await,
        None => serve(ServeCli::parse_from(std::env::args().take(1)).serve.config).await,
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::CreateAdmin(args)) => create_admin(args).await,
        Some(Command::SignWebhook(args)) => sign_webhook(args),
    }
}

async fn serve(config: ApiConfig) -> anyhow::Result<()> {
    config.validate()?;
    let metrics = common::metrics::install("api")?;
    observability::describe();
    let webhook_key = SigningKey::new(common::config::webhook_key(&config.webhook_secret)?);
    let db = common::db::connect(&config.database).await.context("connecting to PostgreSQL")?;
    common::db::migrate(&db).await.context("applying migrations")?;
    let amqp = common::amqp::pool(&config.broker, 4).context("creating the AMQP pool")?;
    let tokens = Tokens::new(config.jwt_secret.expose().as_bytes(), &config.jwt_issuer, config.jwt_ttl());
    let listener = tokio::net::TcpListener::bind(config.bind_addr)
        .await
        .with_context(|| format!("binding {}", config.bind_addr))?;
    let addr = listener.local_addr()?;
    let shutdown = common::shutdown::on_signal();
    let mut tasks = Tasks::new(shutdown.clone());
    let scraped_pool = db.clone();
    let scrape = move || {
        let pool = scraped_pool.clone();
        async move { common::metrics::record_pool(&pool) }
    };
    tasks.spawn("metrics upkeep", common::metrics::upkeep(metrics.clone(), shutdown.clone()));
    let serving =
        common::metrics::serve(config.metrics_addr, common::metrics::router(metrics, scrape), shutdown.clone()).await?;
    tasks.spawn("metrics server", serving);
    let order_watch = Arc::new(OrderWatch::default());
    let revocations = Arc::new(revocations::Revocations::default());
    let catalog = Arc::new(catalog::EventCatalog::default());
    let listened =
        listener::Listened { orders: order_watch.clone(), revocations: revocations.clone(), catalog: catalog.clone() };
    tasks.spawn("notification listener", listener::listen(db.clone(), listened, shutdown.clone()));
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
    let (orders, inserter) = pipeline::OrderInserter::new(db.clone(), publisher, config.broker.partitions);
    tasks.spawn("order inserter", inserter);
    let state = AppState {
        db: db.clone(),
        amqp: amqp.clone(),
        orders,
        catalog,
        sold_out: Arc::new(pipeline::SoldOutHints::new(config.sold_out_hint())),
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
    };
    tracing::info!(%addr, docs = %format!("http://{addr}/docs"), "listening");
    let app = routes::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    tasks.spawn("http server", async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await.context("serving HTTP")
    });
    let supervised = tasks.supervise().await;
    amqp.close();
    db.close().await;
    tracing::info!("api stopped");
    supervised
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

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let db = common::db::connect(&args.database).await.context("connecting to PostgreSQL")?;
    common::db::migrate(&db).await.context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}

async fn create_admin(args: CreateAdminArgs) -> anyhow::Result<()> {
    let email = routes::auth::parse_email(&args.email).map_err(|e| anyhow::anyhow!("{e}"))?;
    let default_name = email.as_str().split('@').next().unwrap_or_default().to_owned();
    let name = UserName::parse(args.name.as_deref().unwrap_or(&default_name))?;
    let db = common::db::connect(&args.database).await.context("connecting to PostgreSQL")?;
    common::db::migrate(&db).await.context("applying migrations")?;

    let promoted: Option<uuid::Uuid> = sqlx::query_scalar!(
        "UPDATE users SET role = 'admin', updated_at = now() WHERE email = $1 RETURNING id",
        email.as_str()
    )
    .fetch_optional(&db)
    .await?;
    if let Some(id) = promoted {
        println!("existing user {email} ({id}) now has the admin role; password unchanged");
        return Ok(());
    }
    let password = match args.password {
        Some(password) => password,
        None => read_password()?,
    };
    let password = Password::parse(password)?;
    let hash = auth::hash_password(&HeavyWork::new(1), password).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let user =
        routes::auth::insert_user(&db, &name, &email, &hash, Role::Admin).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("admin created: {} ({})", user.email, user.id);
    Ok(())
}

fn sign_webhook(args: SignWebhookArgs) -> anyhow::Result<()> {
    let key = SigningKey::new(common::config::webhook_key(&args.webhook_secret)?);
    let id = args.id.unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple()));
    let timestamp = args.timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp());
    let signature = key.sign(&id, timestamp, args.body.as_bytes());
    println!("webhook-id: {id}");
    println!("webhook-timestamp: {timestamp}");
    println!("webhook-signature: {signature}");
    Ok(())
}

fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        // Typed at a terminal: not echoed.
        return rpassword::prompt_password("password for the new admin: ")
            .context("reading the password from the terminal");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
