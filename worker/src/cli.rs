//! The `worker` binary's command line: run (the default), or `health`.

use clap::Parser;
use common::config::WorkerConfig;

use crate::membership;

#[derive(Parser)]
#[command(name = "worker", version, about = "Turnstile worker. Configuration comes from flags or the environment.")]
pub struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Exit 0 if a worker on this host (`HOSTNAME`, e.g. this container) has sent a
    /// heartbeat within the last 5 heartbeat intervals, 1 otherwise: a health check for
    /// orchestrators (docker-compose uses it).
    Health,
}

/// Runs the worker until SIGTERM or Ctrl-C, or the health check `cli` asks for.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Health) => membership::check_health(cli.config).await,
        None => crate::run(cli.config, common::shutdown::on_signal()).await,
    }
}
