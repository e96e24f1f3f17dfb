//! The `api` binary's command line: `serve` (the default), `migrate`, `create-admin`,
//! `sign-webhook`.

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use common::config::{ApiConfig, DatabaseConfig, Secret};
use common::domain::{Password, Role, UserName};
use common::standard_webhooks::SigningKey;

use crate::auth::{self, HeavyWork};
use crate::{Application, routes};

#[derive(Parser)]
#[command(
    name = "api",
    version,
    about = "Turnstile HTTP API. Configuration comes from flags or the environment \
                                          (a .env file in the working directory is read too)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
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
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ApiConfig,
}

/// For `api` with no subcommand: the same flags as `api serve`.
#[derive(Parser)]
#[command(name = "api")]
struct ServeCli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

#[derive(Args)]
pub struct CreateAdminArgs {
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
pub struct SignWebhookArgs {
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

/// Runs the subcommand `cli` names.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Serve(args)) => serve(args.config).await,
        None => serve(ServeCli::parse_from(std::env::args().take(1)).serve.config).await,
        Some(Command::Migrate(args)) => migrate(args).await,
        Some(Command::CreateAdmin(args)) => create_admin(args).await,
        Some(Command::SignWebhook(args)) => sign_webhook(args),
    }
}

/// Serves until SIGTERM or Ctrl-C.
async fn serve(config: ApiConfig) -> anyhow::Result<()> {
    Application::build(config, common::shutdown::on_signal()).await?.run_until_stopped().await
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let db = common::db::connect(&args.database).await.context("connecting to PostgreSQL")?;
    common::db::migrate(&db).await.context("applying migrations")?;
    println!("migrations applied");
    Ok(())
}

async fn create_admin(args: CreateAdminArgs) -> anyhow::Result<()> {
    let email = routes::accounts::parse_email(&args.email).map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let user = routes::accounts::insert_user(&db, &name, &email, &hash, Role::Admin)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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
