//! `worker`: Turnstile's background process; see the [`worker`] library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    let cli = worker::cli::Cli::parse();
    let telemetry = common::telemetry::init("worker");
    let code = common::run_main(worker::cli::run(cli));
    drop(telemetry);
    code
}
