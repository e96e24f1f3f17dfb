//! `worker`: Turnstile's background process. It connects to PostgreSQL and RabbitMQ and
//! runs its loops until SIGTERM/Ctrl-C; the purchase consumers arrive with the pipeline.

use anyhow::Context;
use clap::Parser;
use common::config::WorkerConfig;

#[derive(Parser)]
#[command(name = "worker", version, about = "Turnstile worker. Configuration comes from flags or the environment.")]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

fn main() -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    common::telemetry::init("worker");
    common::run_main(run(cli.config))
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let db = common::db::connect(&config.database).await.context("connecting to PostgreSQL")?;
    common::db::migrate(&db).await.context("applying migrations")?;
    let amqp = common::amqp::pool(&config.broker).context("creating the AMQP pool")?;
    let shutdown = common::shutdown::on_signal();
    tracing::info!(partitions = config.broker.partitions, "worker started");
    shutdown.cancelled().await;
    amqp.close();
    db.close().await;
    tracing::info!("worker stopped");
    Ok(())
}
