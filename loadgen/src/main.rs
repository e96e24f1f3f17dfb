//! `loadgen`: measures Turnstile's purchase path under a stampede, and the synchronous
//! lock-per-request design on the same database minutes apart, so every report states a
//! ratio measured on the same machine.
//!
//! Preparation goes straight to PostgreSQL: users are inserted without password hashes
//! (argon2 is not what is measured) and their tokens are signed with the api's
//! `JWT_SECRET`; events are inserted as rows. Purchases then go over HTTP with keep-alive.
//!
//! Scenarios so far: `hot` (one event, demand a multiple of capacity) and `baseline` (the
//! seed's design: per order BEGIN; lock the event row; count its sold tickets; insert the
//! order and its tickets; COMMIT).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    /// One event; `capacity × demand` buyers fire one order each.
    Hot,
    /// The synchronous design straight against PostgreSQL, same event size and concurrency.
    Baseline,
}

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Turnstile load generator")]
struct Cli {
    #[arg(long, value_enum, default_value = "hot")]
    scenario: Scenario,
    /// The api's base URL.
    #[arg(long, env = "LOADGEN_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// PostgreSQL the api uses (preparation and final counts).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The api's token key, to sign the prepared users' tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Tickets of the event.
    #[arg(long, default_value_t = 1_000)]
    capacity: u32,
    /// Orders per ticket (10 = ten buyers for each ticket).
    #[arg(long, default_value_t = 10)]
    demand: u32,
    /// Requests (or baseline transactions) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Directory for the JSON result of this run.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
}

/// One run's figures: what BENCHMARKS.md quotes.
#[derive(Debug, Serialize)]
struct Report {
    scenario: Scenario,
    started_at: DateTime<Utc>,
    orders: u64,
    concurrency: usize,
    capacity: u32,
    accepted: u64,
    refused: u64,
    errors: u64,
    accepted_per_sec: f64,
    /// Orders that reached a final decision per second, first accept to last decision.
    end_to_end_per_sec: f64,
    accept_ms: Option<Percentiles>,
    accept_to_final_ms: Option<Percentiles>,
    sold: i64,
    oversold: i64,
    lost: i64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(cli.concurrency).unwrap_or(64).clamp(4, 90))
        .connect(&cli.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    let orders = u64::from(cli.capacity) * u64::from(cli.demand);
    let event = insert_event(&db, cli.capacity).await?;
    let report = match cli.scenario {
        Scenario::Hot => hot(&cli, &db, event, orders).await?,
        Scenario::Baseline => baseline(&cli, &db, event, orders).await?,
    };
    print_report(&report);
    std::fs::create_dir_all(&cli.out)?;
    let path =
        cli.out.join(format!("{}-{:?}.json", report.started_at.format("%Y%m%dT%H%M%S"), cli.scenario).to_lowercase());
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("result written to {}", path.display());
    Ok(())
}

async fn insert_event(db: &PgPool, capacity: u32) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (id, name, location, organization, starts_at, capacity, price, max_per_order)
         VALUES ($1, 'Load test', 'Bench', 'loadgen', now() + interval '30 days', $2, 10, 10)",
    )
    .bind(id)
    .bind(i32::try_from(capacity)?)
    .execute(db)
    .await?;
    Ok(id)
}

/// `n` users straight into the database, with tokens signed as the api would.
async fn buyers(db: &PgPool, jwt_secret: &str, n: u64) -> anyhow::Result<Vec<String>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(10_000) {
        let emails: Vec<String> = chunk.iter().map(|id| format!("load-{}@example.com", id.simple())).collect();
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash)
             SELECT id, email, 'Load', 'not-a-password-hash' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
        )
        .bind(chunk)
        .bind(&emails)
        .execute(db)
        .await?;
    }
    let key = jsonwebtoken::EncodingKey::from_secret(jwt_secret.as_bytes());
    let now = Utc::now().timestamp();
    ids.iter()
        .map(|id| {
            let claims =
                serde_json::json!({"sub": id, "role": "user", "iss": "turnstile", "iat": now, "exp": now + 7200});
            Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
        })
        .collect()
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

/// The stampede over HTTP, then the wait until every accepted order is decided.
async fn hot(cli: &Cli, db: &PgPool, event: Uuid, orders: u64) -> anyhow::Result<Report> {
    let tokens = buyers(db, &cli.jwt_secret, orders).await?;
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(cli.concurrency).timeout(Duration::from_secs(30)).build()?;
    let url = Arc::new(format!("{}/api/v1/orders", cli.api.trim_end_matches('/')));
    let bar = progress(orders, "orders");
    let started_at = Utc::now();
    let started = Instant::now();
    let results: Vec<(u16, u64)> = futures_util::stream::iter(tokens)
        .map(|token| {
            let (client, url, bar) = (client.clone(), url.clone(), bar.clone());
            async move {
                let sent = Instant::now();
                let status = client
                    .post(url.as_str())
                    .bearer_auth(token)
                    .json(&serde_json::json!({"event_id": event, "quantity": 1}))
                    .send()
                    .await
                    .map(|response| response.status().as_u16())
                    .unwrap_or(0);
                bar.inc(1);
                (status, u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX))
            }
        })
        .buffer_unordered(cli.concurrency)
        .collect()
        .await;
    let accept_elapsed = started.elapsed();
    bar.finish();

    let mut latency = Histogram::<u64>::new(3)?;
    let (mut accepted, mut refused, mut errors) = (0, 0, 0);
    for (status, micros) in &results {
        match status {
            202 => {
                accepted += 1;
                latency.record(*micros)?;
            }
            409 => refused += 1,
            _ => errors += 1,
        }
    }
    let queued = wait_until_decided(db, event, Duration::from_secs(600)).await?;
    let decided: Vec<(DateTime<Utc>, DateTime<Utc>)> =
        sqlx::query_as("SELECT created_at, updated_at FROM orders WHERE event_id = $1 AND status <> 'QUEUED'")
            .bind(event)
            .fetch_all(db)
            .await?;
    let mut to_final = Histogram::<u64>::new(3)?;
    let mut last = started_at;
    for (created, updated) in &decided {
        to_final.record(u64::try_from((*updated - *created).num_microseconds().unwrap_or(0).max(0))?)?;
        last = last.max(*updated);
    }
    let span = (last - started_at).to_std().unwrap_or_default().as_secs_f64().max(f64::EPSILON);
    let (sold, oversold) = sold_and_oversold(db, event).await?;
    Ok(Report {
        scenario: Scenario::Hot,
        started_at,
        orders,
        concurrency: cli.concurrency,
        capacity: cli.capacity,
        accepted,
        refused,
        errors,
        accepted_per_sec: accepted as f64 / accept_elapsed.as_secs_f64(),
        end_to_end_per_sec: decided.len() as f64 / span,
        accept_ms: (accepted > 0).then(|| Percentiles::of(&latency)),
        accept_to_final_ms: (!decided.is_empty()).then(|| Percentiles::of(&to_final)),
        sold,
        oversold,
        lost: queued,
    })
}

/// Waits until the event has no `QUEUED` order; returns how many are left at the timeout.
async fn wait_until_decided(db: &PgPool, event: Uuid, timeout: Duration) -> anyhow::Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'QUEUED'")
            .bind(event)
            .fetch_one(db)
            .await?;
        if queued == 0 || Instant::now() >= deadline {
            return Ok(queued);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sold`, and how far live tickets exceed capacity (0 unless something is badly wrong).
async fn sold_and_oversold(db: &PgPool, event: Uuid) -> anyhow::Result<(i64, i64)> {
    let (capacity, live): (i32, i64) = sqlx::query_as(
        "SELECT e.capacity, (SELECT count(*) FROM tickets t WHERE t.event_id = e.id AND t.status = 'ACTIVE')
         FROM events e WHERE e.id = $1",
    )
    .bind(event)
    .fetch_one(db)
    .await?;
    Ok((live, (live - i64::from(capacity)).max(0)))
}

/// The seed's synchronous design, one transaction per order, at the same concurrency.
async fn baseline(cli: &Cli, db: &PgPool, event: Uuid, orders: u64) -> anyhow::Result<Report> {
    let ids: Vec<Uuid> = (0..orders).map(|_| Uuid::now_v7()).collect();
    let emails: Vec<String> = ids.iter().map(|id| format!("base-{}@example.com", id.simple())).collect();
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash)
         SELECT id, email, 'Load', 'x' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
    )
    .bind(&ids)
    .bind(&emails)
    .execute(db)
    .await?;
    let bar = progress(orders, "baseline");
    let started_at = Utc::now();
    let started = Instant::now();
    let results: Vec<anyhow::Result<(bool, u64)>> = futures_util::stream::iter(ids)
        .map(|user| {
            let (db, bar) = (db.clone(), bar.clone());
            async move {
                let sent = Instant::now();
                let sold = synchronous_purchase(&db, event, user).await?;
                bar.inc(1);
                Ok((sold, u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX)))
            }
        })
        .buffer_unordered(cli.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish();
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut accepted, mut refused, mut errors) = (0, 0, 0);
    for result in &results {
        match result {
            Ok((sold, micros)) => {
                latency.record(*micros)?;
                if *sold { accepted += 1 } else { refused += 1 }
            }
            Err(_) => errors += 1,
        }
    }
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        eprintln!("baseline errors, e.g.: {err:#}");
    }
    let (sold, oversold) = sold_and_oversold(db, event).await?;
    if sold != accepted as i64 {
        bail!("baseline sold {sold} tickets but reported {accepted}");
    }
    Ok(Report {
        scenario: Scenario::Baseline,
        started_at,
        orders,
        concurrency: cli.concurrency,
        capacity: cli.capacity,
        accepted,
        refused,
        errors,
        accepted_per_sec: orders as f64 / elapsed,
        end_to_end_per_sec: orders as f64 / elapsed,
        accept_ms: Some(Percentiles::of(&latency)),
        accept_to_final_ms: Some(Percentiles::of(&latency)),
        sold,
        oversold,
        lost: 0,
    })
}

/// BEGIN; lock the event row; count its sold tickets; insert the order and its ticket;
/// COMMIT. Returns whether a ticket was sold.
async fn synchronous_purchase(db: &PgPool, event: Uuid, user: Uuid) -> anyhow::Result<bool> {
    let mut tx = db.begin().await?;
    let capacity: i32 = sqlx::query_scalar("SELECT capacity FROM events WHERE id = $1 FOR UPDATE")
        .bind(event)
        .fetch_one(&mut *tx)
        .await?;
    let sold: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'ACTIVE'")
        .bind(event)
        .fetch_one(&mut *tx)
        .await?;
    let order = Uuid::now_v7();
    let available = sold < i64::from(capacity);
    let (status, reason) = if available { ("PAID", None) } else { ("REJECTED", Some("SOLD_OUT")) };
    sqlx::query(
        "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, status, reason)
         VALUES ($1, $2, $3, 1, 10, 10, $4, $5)",
    )
    .bind(order)
    .bind(user)
    .bind(event)
    .bind(status)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if available {
        sqlx::query("INSERT INTO tickets (id, order_id, event_id) VALUES ($1, $2, $3)")
            .bind(Uuid::now_v7())
            .bind(order)
            .bind(event)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(available)
}

fn print_report(report: &Report) {
    let pct = |p: &Option<Percentiles>| match p {
        Some(p) => format!("p50 {:.1} / p99 {:.1} / max {:.1} ms", p.p50, p.p99, p.max),
        None => "-".to_owned(),
    };
    println!();
    println!("scenario            {:?}", report.scenario);
    println!("orders              {} at concurrency {}", report.orders, report.concurrency);
    println!("accepted/refused    {} / {} ({} errors)", report.accepted, report.refused, report.errors);
    println!("accepted/s          {:.0}", report.accepted_per_sec);
    println!("end-to-end orders/s {:.0}", report.end_to_end_per_sec);
    println!("accept latency      {}", pct(&report.accept_ms));
    println!("accept → final      {}", pct(&report.accept_to_final_ms));
    println!("sold / capacity     {} / {}", report.sold, report.capacity);
    println!("oversold            {}", report.oversold);
    println!("lost                {}", report.lost);
}
