//! The scenarios that go through the api: `hot`, `spread`, `tiers`, `rate`, `backlog`,
//! `prequeue` and `ceiling`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cost::Sampler;
use crate::prepare;
use crate::report::{Drain, DrawRun, Percentiles, Report, Timeline};
use crate::{RunArgs, Scenario};

/// How long a run waits for accepted orders to be decided before it counts them lost.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(3600);
/// `rate`: most requests outstanding at once (beyond that the server is hopelessly behind).
const RATE_MAX_OUTSTANDING: usize = 16_384;

pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

/// The `tiers` scenario's `i`-th order: in turn General ×1; General ×1 + VIP ×1; Student ×2 +
/// General ×1; VIP ×1 + Student ×1 + General ×2 (two tickets an order on average).
fn tiers_order(event: Uuid, [general, vip, student]: &[Uuid; 3], i: u64) -> serde_json::Value {
    let lines: &[(Uuid, u32)] = match i % 4 {
        0 => &[(*general, 1)],
        1 => &[(*general, 1), (*vip, 1)],
        2 => &[(*student, 2), (*general, 1)],
        _ => &[(*vip, 1), (*student, 1), (*general, 2)],
    };
    let items: Vec<serde_json::Value> =
        lines.iter().map(|(t, quantity)| serde_json::json!({"ticket_type_id": t, "quantity": quantity})).collect();
    serde_json::json!({"event_id": event, "items": items})
}

/// One request's outcome.
struct Answer {
    status: u16,
    /// From when it was sent (closed loop) or due (open loop) to its answer.
    micros: u64,
    /// Open loop: how late the load generator itself started the request, after it was due
    /// (counted in `micros`: an open loop's latency runs from when a request was due).
    late_micros: Option<u64>,
    answered_at: DateTime<Utc>,
}

/// `types`: the `tiers` scenario's ticket types per event (empty otherwise); `users`: the
/// buyers, made before the run.
pub async fn run(
    args: &RunArgs,
    db: &PgPool,
    events: &[Uuid],
    types: &[[Uuid; 3]],
    users: &[Uuid],
) -> anyhow::Result<Report> {
    let orders = args.orders();
    let typed = !types.is_empty();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(256))
        .timeout(Duration::from_secs(30))
        .build()?;
    let database = db.connect_options().get_database().unwrap_or("turnstile_bench").to_owned();
    let sampler = Sampler::start(&args.cost, args.api_pid, args.worker_pid, &database).await?;
    let started_at = Utc::now();
    let started = Instant::now();
    let answers = send_all(args, &http, events, types, users, started).await?;
    let send_elapsed = started.elapsed().as_secs_f64();
    let Tally { latency, late, accepted, refused, errors, mut last_decision } = tally(args, &answers, started_at)?;
    let (drain, worker_peak) = match args.scenario {
        Scenario::Backlog => {
            let worker = args.worker.as_deref().context("--scenario backlog needs --worker PATH")?;
            let (drain, peak) = drain(worker, args.api_pid, db, events, accepted).await?;
            (Some(drain), peak)
        }
        _ => (None, None),
    };
    let opened = if args.scenario == Scenario::Prequeue { Some(prepare::open_sale(db, events).await?) } else { None };
    let lost = prepare::wait_until_decided(db, events, DECIDE_TIMEOUT).await?;
    // Decisions are stamped with their transaction's start; the clock says when they were done.
    let settled = Utc::now();
    let decided_count: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM orders WHERE event_id = ANY($1) AND status <> 'QUEUED'"#,
        events
    )
    .fetch_one(db)
    .await?;
    let ceiling = args.scenario == Scenario::Ceiling;
    let decided_orders = if ceiling { accepted } else { u64::try_from(decided_count).unwrap_or(0) + refused };
    let cost = sampler.finish(decided_orders, &http).await?;

    let decided = accept_to_decision(db, events).await?;
    let mut to_final = Histogram::<u64>::new(3)?;
    for (created, decided) in &decided {
        to_final.record(u64::try_from((*decided - *created).num_microseconds().unwrap_or(0).max(0))?)?;
        last_decision = last_decision.max(*decided);
    }
    let span = (last_decision - started_at).to_std().unwrap_or_default().as_secs_f64().max(f64::EPSILON);
    let timeline = timeline(started_at, &answers, &decided, &latency, ceiling)?;
    let (sold, oversold) = prepare::sold_and_oversold(db, events, typed).await?;
    let draw = match opened {
        Some(opened) => Some(draw_run(db, events, opened, settled).await?),
        None => None,
    };
    let peak = |pid: Option<u32>| pid.and_then(prepare::memory_mib).map(|(_, peak)| peak);
    Ok(Report {
        scenario: args.scenario,
        label: args.label.clone(),
        started_at,
        events: args.events,
        capacity: args.capacity,
        orders,
        concurrency: args.concurrency,
        rate: (args.scenario == Scenario::Rate).then_some(args.rate),
        accepted,
        refused,
        errors,
        answered_per_sec: (accepted + refused) as f64 / send_elapsed,
        end_to_end_per_sec: if ceiling {
            accepted as f64 / send_elapsed
        } else {
            (decided.len() as u64 + refused) as f64 / span
        },
        accept_ms: Percentiles::of(&latency),
        started_late_ms: Percentiles::of(&late),
        accept_to_final_ms: Percentiles::of(&to_final),
        sold,
        oversold,
        lost,
        api_peak_rss_mib: peak(args.api_pid),
        worker_peak_rss_mib: worker_peak.or_else(|| peak(args.worker_pid)),
        drain,
        draw,
        cost: Some(cost),
        timeline: Some(timeline),
    })
}

/// The run's picture: accepted and decided per second, the accept-latency curve, and the
/// accept latency's p50 and p99 in each second.
fn timeline(
    started_at: DateTime<Utc>,
    answers: &[Answer],
    decided: &[(DateTime<Utc>, DateTime<Utc>)],
    latency: &Histogram<u64>,
    ceiling: bool,
) -> anyhow::Result<Timeline> {
    let accepted = || answers.iter().filter(|a| matches!(a.status, 200 | 202));
    let decided_at =
        decided.iter().map(|(_, at)| *at).chain(answers.iter().filter(|a| a.status == 409).map(|a| a.answered_at));
    Ok(Timeline {
        accepted_per_sec: Timeline::per_second(started_at, accepted().map(|a| a.answered_at)),
        decided_per_sec: if ceiling { Vec::new() } else { Timeline::per_second(started_at, decided_at) },
        accept_latency_ms: Timeline::latency_curve(latency),
        accept_p50_p99_ms_per_sec: Timeline::latency_per_second(
            started_at,
            accepted().map(|a| (a.answered_at, a.micros)),
        )?,
    })
}

/// `prequeue`: from the opening to the draw, and the entries decided per second after it
/// (until every order was seen decided, `settled`; polled every 20 ms).
async fn draw_run(
    db: &PgPool,
    events: &[Uuid],
    opened: DateTime<Utc>,
    settled: DateTime<Utc>,
) -> anyhow::Result<DrawRun> {
    let row = sqlx::query!(
        r#"SELECT max(drawn_at) AS drawn_at, coalesce(sum(draw_entries), 0)::int8 AS "entries!"
           FROM events WHERE id = ANY($1)"#,
        events
    )
    .fetch_one(db)
    .await?;
    let drawn = row.drawn_at.context("the sale opened but no draw happened")?;
    let seconds = |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).to_std().unwrap_or_default().as_secs_f64();
    Ok(DrawRun {
        entries: u64::try_from(row.entries).unwrap_or(0),
        draw_ms: seconds(opened, drawn) * 1000.0,
        decided_per_sec: row.entries as f64 / seconds(drawn, settled).max(f64::EPSILON),
    })
}

/// Sends the run's orders (closed loop: `concurrency` at a time; `rate`: on schedule) and
/// returns every answer.
async fn send_all(
    args: &RunArgs,
    http: &reqwest::Client,
    events: &[Uuid],
    types: &[[Uuid; 3]],
    users: &[Uuid],
    started: Instant,
) -> anyhow::Result<Vec<Answer>> {
    let orders = args.orders();
    let tokens: Arc<[String]> = prepare::tokens(users, &args.jwt_secret, args.jwt_ttl_secs)?.into();
    let route = if args.scenario == Scenario::Ceiling { "/api/v1/orders/quote" } else { "/api/v1/orders" };
    let url: Arc<str> = format!("{}{route}", args.api.trim_end_matches('/')).into();
    let events_list: Arc<[Uuid]> = events.into();
    let types: Arc<[[Uuid; 3]]> = types.into();
    let bar = progress(orders, "orders");
    let promo_code = args.promo_code;
    let send = move |i: u64, due: Option<Instant>| {
        let (client, url, tokens, events, types, bar) =
            (http.clone(), url.clone(), tokens.clone(), events_list.clone(), types.clone(), bar.clone());
        async move {
            let now = Instant::now();
            let late_micros = due.map(|due| micros(now.saturating_duration_since(due)));
            let sent = due.unwrap_or(now);
            let token = &tokens[(i % tokens.len() as u64) as usize];
            let index = (i % events.len() as u64) as usize;
            let event = events[index];
            let mut body = match types.get(index) {
                Some(types) => tiers_order(event, types, i),
                None => serde_json::json!({"event_id": event, "quantity": 1}),
            };
            if promo_code {
                body["promo_code"] = prepare::PROMO_CODE.into();
            }
            let status = client
                .post(&*url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .map_or(0, |response| response.status().as_u16());
            bar.inc(1);
            Answer { status, micros: micros(sent.elapsed()), late_micros, answered_at: Utc::now() }
        }
    };
    if args.scenario != Scenario::Rate {
        return Ok(futures_util::stream::iter(0..orders)
            .map(|i| send(i, None))
            .buffer_unordered(args.concurrency)
            .collect()
            .await);
    }
    // Open loop: each request is started when due (not made ahead of time: thousands of
    // requests set up at once would delay the first ones), at most RATE_MAX_OUTSTANDING at once.
    // tokio's timer has millisecond ticks, so requests start up to about a millisecond after
    // they were due, in small bursts; that lateness counts in the accept latency (which runs
    // from when a request was due) and is reported on its own. (Each request's task also
    // slept until it was due, which tokio may end only at its next tick: no longer.)
    let gap = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let outstanding = Arc::new(tokio::sync::Semaphore::new(RATE_MAX_OUTSTANDING));
    let mut requests = Vec::with_capacity(usize::try_from(orders).unwrap_or(0));
    for i in 0..orders {
        let due = started + gap.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = outstanding.clone().acquire_owned().await?;
        let request = send(i, Some(due));
        requests.push(tokio::spawn(async move {
            let answer = request.await;
            drop(permit);
            answer
        }));
    }
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        answers.push(request.await?);
    }
    Ok(answers)
}

/// A latency in whole microseconds, as the histograms record it.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The answers counted: accepted (with their latencies), refused, errors, and the last
/// refusal (a refusal is a decision).
struct Tally {
    latency: Histogram<u64>,
    /// Open loop: how late the requests were started (see [`Answer::late_micros`]).
    late: Histogram<u64>,
    accepted: u64,
    refused: u64,
    errors: u64,
    last_decision: DateTime<Utc>,
}

fn tally(args: &RunArgs, answers: &[Answer], started_at: DateTime<Utc>) -> anyhow::Result<Tally> {
    let mut tally = Tally {
        latency: Histogram::<u64>::new(3)?,
        late: Histogram::<u64>::new(3)?,
        accepted: 0,
        refused: 0,
        errors: 0,
        last_decision: started_at,
    };
    for answer in answers {
        if let Some(late) = answer.late_micros {
            tally.late.record(late)?;
        }
        match answer.status {
            202 => {
                tally.accepted += 1;
                tally.latency.record(answer.micros)?;
            }
            // The ceiling's quote: answered, nothing to decide.
            200 if args.scenario == Scenario::Ceiling => {
                tally.accepted += 1;
                tally.latency.record(answer.micros)?;
            }
            409 => {
                tally.refused += 1;
                tally.last_decision = tally.last_decision.max(answer.answered_at);
            }
            _ => tally.errors += 1,
        }
    }
    if tally.errors > 0 {
        eprintln!("{} requests were answered with neither 202 nor 409 (or not at all)", tally.errors);
    }
    Ok(tally)
}

/// Each decided order's acceptance and first decision, from its own status changes (the
/// view, which a build kept aside for comparison has as well, whichever row holds them).
async fn accept_to_decision(db: &PgPool, events: &[Uuid]) -> sqlx::Result<Vec<(DateTime<Utc>, DateTime<Utc>)>> {
    let rows = sqlx::query!(
        r#"SELECT o.created_at, min(c.at) AS "decided!" FROM orders o
           JOIN order_status_changes c ON c.order_id = o.id AND c.status <> 'QUEUED'
           WHERE o.event_id = ANY($1) GROUP BY o.id"#,
        events
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|row| (row.created_at, row.decided)).collect())
}

/// `backlog`: starts a worker on the queued orders, samples memory every second until they
/// are all decided, then stops the worker (SIGTERM). Returns the drain and the worker's peak
/// memory.
async fn drain(
    worker: &Path,
    api_pid: Option<u32>,
    db: &PgPool,
    events: &[Uuid],
    accepted: u64,
) -> anyhow::Result<(Drain, Option<f64>)> {
    let mut child = tokio::process::Command::new(worker)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", worker.display()))?;
    let pid = child.id().context("the worker exited at once")?;
    let bar = progress(accepted, "drained");
    let started = Instant::now();
    let (mut api_rss, mut worker_rss) = (Vec::new(), Vec::new());
    let mut worker_peak = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(rss) = api_pid.and_then(prepare::memory_mib) {
            api_rss.push(rss.0);
        }
        if let Some((rss, peak)) = prepare::memory_mib(pid) {
            worker_rss.push(rss);
            worker_peak = Some(peak);
        }
        let mut left = u64::try_from(prepare::queued_by_counters(db, events).await?).unwrap_or(0);
        if left == 0 {
            left = u64::try_from(prepare::queued(db, events).await?).unwrap_or(0);
        }
        bar.set_position(accepted.saturating_sub(left));
        if left == 0 || started.elapsed() > DECIDE_TIMEOUT {
            break;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the worker exited during the drain ({status})");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
        child.kill().await?;
    }
    let drain = Drain {
        orders: accepted,
        seconds,
        per_sec: accepted as f64 / seconds,
        api_rss_mib: api_rss,
        worker_rss_mib: worker_rss,
    };
    Ok((drain, worker_peak))
}
