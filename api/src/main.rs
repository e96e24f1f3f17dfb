//! `api`: Turnstile's HTTP server, plus the operator's subcommands (`migrate`,
//! `create-admin`, `sign-webhook`); see [`api::cli`].

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    let cli = api::cli::Cli::parse();
    let telemetry = common::telemetry::init("api");
    let code = common::run_main(api::cli::run(cli));
    drop(telemetry);
    code
}
