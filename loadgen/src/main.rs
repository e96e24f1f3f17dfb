//! `loadgen`: measures Turnstile's purchase path, and the synchronous lock-per-request
//! design on the same database minutes apart, so every report states a ratio measured on
//! the same machine. `make bench` (scripts/bench.sh) starts everything and runs it.
//!
//! Preparation goes straight to PostgreSQL: users are inserted without password hashes
//! (argon2 is not what is measured) and their tokens are signed with the api's
//! `JWT_SECRET`; events are inserted as rows. Purchases then go over HTTP with keep-alive.
//!
//! Scenarios (`run --scenario`):
//! - `hot`: one event, demand a multiple of capacity, a fixed number of requests in flight;
//! - `spread`: the same over many events (`--events`);
//! - `tiers`: like `hot`, on events of three ticket types (General admission without stock
//!   of its own, VIP with a tenth of the capacity, Student with a fifth, all under the
//!   event's capacity), with orders of one to three lines (two tickets each on average);
//! - `rate`: requests sent at a fixed arrival rate (open loop: latency counts from when a
//!   request was due, so a slow server cannot hide its queue);
//! - `backlog`: orders accepted while no worker runs, then a worker started (`--worker`),
//!   timing the drain and sampling api and worker memory throughout;
//! - `prequeue`: `hot`'s orders sent in the event's pre-sale window (one entry per buyer:
//!   as many buyers as orders), then the sale opened: the time from the opening to the
//!   draw, and the entries decided per second after it;
//! - `baseline`: the seed's design straight against PostgreSQL, per order BEGIN; lock the
//!   event row; count its sold tickets; insert the order and its tickets; COMMIT;
//! - `ceiling`: the cheapest request with the purchase path's fixed work, `POST
//!   /api/v1/orders/quote` (authentication, JSON in and out, the event from the api's
//!   memory; no database, no broker): what the api could answer if storing and deciding
//!   orders cost nothing.
//!
//! Each run also reports what it cost (`cost`): CPU time per process, statements, rows
//! written and broker messages per decided order; and draws its picture (`plot`).
//!
//! `summary DIR` turns the JSON files of several runs into medians and ratios.

// Functions stay under 80 lines (clippy.toml) outside tests.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

mod baseline;
mod cost;
mod http;
mod plot;
mod prepare;
mod report;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Turnstile load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario and write its JSON result. A later argument overrides an earlier one.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Medians per scenario, and pipeline/baseline ratios, over the JSON results in a directory.
    Summary {
        dir: PathBuf,
        /// Also write the table as Markdown to this file.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Hot,
    Spread,
    Tiers,
    Rate,
    Backlog,
    Prequeue,
    Baseline,
    Ceiling,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value = "hot")]
    pub scenario: Scenario,
    /// The api's base URL.
    #[arg(long, env = "LOADGEN_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// PostgreSQL the api uses (preparation and final counts).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The api's token key, to sign the prepared users' tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// The api's token lifetime: the tokens' `exp` is their `iat` plus this (the api refuses
    /// tokens that would live longer than it issues them for).
    #[arg(long, env = "JWT_TTL_SECS", default_value_t = 3600)]
    pub jwt_ttl_secs: u64,
    /// Number of events; orders go to them in turn.
    #[arg(long, default_value_t = 1)]
    pub events: u32,
    /// Tickets of each event.
    #[arg(long, default_value_t = 2_000)]
    pub capacity: u32,
    /// Orders per ticket (10 = ten buyers for each ticket); orders = events × capacity × demand.
    #[arg(long, default_value_t = 10)]
    pub demand: u32,
    /// Requests (or baseline transactions) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// `rate`: requests per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Buyers; each sends orders in turn (at most one per order).
    #[arg(long, default_value_t = 10_000)]
    pub users: u32,
    /// Process id of the api, to report its peak memory.
    #[arg(long)]
    pub api_pid: Option<u32>,
    /// Process id of the worker, to report its peak memory.
    #[arg(long)]
    pub worker_pid: Option<u32>,
    /// `backlog`: the worker binary to start once the backlog is in (environment inherited).
    #[arg(long)]
    pub worker: Option<PathBuf>,
    /// What the api was started with, recorded in the result (e.g. `fast-path-off`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Every order carries a promo code of its event (10% off every type, `max_uses` the
    /// event's capacity, `max_uses_per_buyer` 10: the allocator counts both limits); the
    /// result's label says so.
    #[arg(long)]
    pub promo_code: bool,
    /// Directory for the JSON result of this run.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    #[command(flatten)]
    pub cost: cost::CostArgs,
}

impl RunArgs {
    pub fn orders(&self) -> u64 {
        u64::from(self.events) * u64::from(self.capacity) * u64::from(self.demand)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(*args).await,
        Command::Summary { dir, markdown } => report::summary(&dir, markdown.as_deref()),
    }
}

async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    if args.promo_code {
        args.label = [args.label.as_str(), "promo code"]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
    }
    let pool = || {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(args.concurrency).unwrap_or(64).clamp(4, 90))
            .connect(&args.database_url)
    };
    // The run's data is made by connections of its own, closed before the run: a session
    // that ends reports its row counts at once, so the run's cost (rows written) holds
    // none of them.
    let setup = pool().await.context("connecting to PostgreSQL")?;
    let events = prepare::events(&setup, args.events, args.capacity).await?;
    let types = if args.scenario == Scenario::Tiers {
        prepare::tiers(&setup, &events, args.capacity).await?
    } else {
        Vec::new()
    };
    if args.promo_code {
        prepare::promo_codes(&setup, &events, args.capacity).await?;
    }
    if args.scenario == Scenario::Prequeue {
        prepare::presale(&setup, &events).await?;
        // One open entry per buyer and event.
        args.users = args.users.max(u32::try_from(args.orders()).unwrap_or(u32::MAX));
    }
    let users = prepare::users(&setup, u64::from(args.users.max(1)).min(args.orders())).await?;
    setup.close().await;
    let db = pool().await.context("connecting to PostgreSQL")?;
    let report = match args.scenario {
        Scenario::Baseline => baseline::run(&args, &db, &events, &users).await?,
        _ => http::run(&args, &db, &events, &types, &users).await?,
    };
    report.print();
    std::fs::create_dir_all(&args.out)?;
    let name = format!("{}-{:?}", report.started_at.format("%Y%m%dT%H%M%S%.3f"), args.scenario).to_lowercase();
    let path = args.out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("result written to {}", path.display());
    if let Some(timeline) = &report.timeline {
        let picture = args.out.join(format!("{name}.svg"));
        plot::draw(&picture, &report, timeline)?;
        println!("picture written to {}", picture.display());
    }
    Ok(())
}
