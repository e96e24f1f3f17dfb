//! What the `api` and `worker` processes share: domain types, configuration, the database
//! pool and migrations, the AMQP connection, and logging set-up.

// Functions stay under 80 lines (clippy.toml) outside tests.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

pub mod amqp;
pub mod config;
pub mod db;
pub mod domain;
pub mod metrics;
pub mod notifications;
pub mod sales;
pub mod shutdown;
pub mod standard_webhooks;
pub mod supervise;
pub mod telemetry;
pub mod webhook_targets;

/// Runs a binary's async main on a multi-threaded runtime and turns its error into one
/// readable line on stderr and exit status 1 (rather than a debug dump).
pub fn run_main(main: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "exiting");
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
