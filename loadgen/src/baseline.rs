//! `baseline`: the seed's synchronous design, one transaction per order, straight against
//! the same PostgreSQL at the same concurrency.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::progress;
use crate::prepare;
use crate::report::{Percentiles, Report, Timeline};

/// `users`: the buyers, made before the run.
pub async fn run(args: &crate::RunArgs, db: &PgPool, events: &[Uuid], users: &[Uuid]) -> anyhow::Result<Report> {
    let orders = args.orders();
    let users: Arc<[Uuid]> = users.into();
    let events_list: Arc<[Uuid]> = events.into();
    let bar = progress(orders, "baseline");
    let database = db.connect_options().get_database().unwrap_or("turnstile_bench").to_owned();
    let sampler = crate::cost::Sampler::start(&args.cost, None, None, &database).await?;
    let started_at = Utc::now();
    let started = Instant::now();
    let results: Vec<anyhow::Result<(bool, u64, chrono::DateTime<Utc>)>> = futures_util::stream::iter(0..orders)
        .map(|i| {
            let (db, bar, users, events) = (db.clone(), bar.clone(), users.clone(), events_list.clone());
            async move {
                let user = users[(i % users.len() as u64) as usize];
                let event = events[(i % events.len() as u64) as usize];
                let sent = Instant::now();
                let sold = synchronous_purchase(&db, event, user).await?;
                bar.inc(1);
                Ok((sold, crate::http::micros(sent.elapsed()), Utc::now()))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish();
    let http = reqwest::Client::new();
    let cost = sampler.finish(orders, &http).await?;
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut accepted, mut refused, mut errors) = (0, 0, 0);
    for result in &results {
        match result {
            Ok((sold, micros, _)) => {
                latency.record(*micros)?;
                if *sold { accepted += 1 } else { refused += 1 }
            }
            Err(_) => errors += 1,
        }
    }
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        eprintln!("baseline errors, e.g.: {err:#}");
    }
    let (sold, oversold) = prepare::sold_and_oversold(db, events, false).await?;
    if sold != accepted as i64 {
        bail!("baseline sold {sold} tickets but reported {accepted}");
    }
    Ok(Report {
        scenario: crate::Scenario::Baseline,
        label: args.label.clone(),
        started_at,
        events: args.events,
        capacity: args.capacity,
        orders,
        concurrency: args.concurrency,
        rate: None,
        accepted,
        refused,
        errors,
        answered_per_sec: orders as f64 / elapsed,
        end_to_end_per_sec: orders as f64 / elapsed,
        accept_ms: Percentiles::of(&latency),
        started_late_ms: None,
        accept_to_final_ms: Percentiles::of(&latency),
        sold,
        oversold,
        lost: 0,
        api_peak_rss_mib: None,
        worker_peak_rss_mib: None,
        drain: None,
        draw: None,
        cost: Some(cost),
        timeline: Some(timeline(started_at, &results, &latency)?),
    })
}

/// The run's picture: each transaction is accepted and decided at once.
fn timeline(
    started_at: DateTime<Utc>,
    results: &[anyhow::Result<(bool, u64, DateTime<Utc>)>],
    latency: &Histogram<u64>,
) -> anyhow::Result<Timeline> {
    let done = || results.iter().filter_map(|result| result.as_ref().ok());
    Ok(Timeline {
        accepted_per_sec: Timeline::per_second(started_at, done().map(|(_, _, at)| *at)),
        decided_per_sec: Timeline::per_second(started_at, done().map(|(_, _, at)| *at)),
        accept_latency_ms: Timeline::latency_curve(latency),
        accept_p50_p99_ms_per_sec: Timeline::latency_per_second(
            started_at,
            done().map(|(_, micros, at)| (*at, *micros)),
        )?,
    })
}

/// BEGIN; lock the event row; count its sold tickets; insert the order and its ticket;
/// COMMIT. Returns whether a ticket was sold.
async fn synchronous_purchase(db: &PgPool, event: Uuid, user: Uuid) -> anyhow::Result<bool> {
    let mut tx = db.begin().await?;
    let event_row = sqlx::query!(
        r#"SELECT capacity, default_ticket_type_id AS "ticket_type!" FROM events WHERE id = $1 FOR UPDATE"#,
        event
    )
    .fetch_one(&mut *tx)
    .await?;
    let (capacity, ticket_type) = (event_row.capacity, event_row.ticket_type);
    let sold: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM tickets WHERE event_id = $1 AND status = 'ACTIVE'"#,
        event
    )
    .fetch_one(&mut *tx)
    .await?;
    let order = Uuid::now_v7();
    let available = sold < i64::from(capacity);
    let (status, reason) = if available { ("PAID", None) } else { ("REJECTED", Some("SOLD_OUT")) };
    sqlx::query!(
        "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, status, reason, lines)
         VALUES ($1, $2, $3, 1, 10, 10, $4, $5, json_build_array(json_build_object(
                     'ticket_type_id', $6::uuid, 'name', 'General admission', 'quantity', 1, 'unit_price', '10.00')))",
        order,
        user,
        event,
        status,
        reason,
        ticket_type
    )
    .execute(&mut *tx)
    .await?;
    if available {
        sqlx::query!(
            "INSERT INTO tickets (id, order_id, event_id, ticket_type_id) VALUES ($1, $2, $3, $4)",
            Uuid::now_v7(),
            order,
            event,
            ticket_type
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(available)
}
