//! Faults under a steady purchase load: the worker killed mid-batch, one of two workers
//! killed, api and worker stopped with SIGTERM, RabbitMQ and PostgreSQL restarted.
//!
//! After each fault the load stops, the system settles, and the promises are checked in SQL
//! and over the API: every order that got `202` exists and is final; per event `sold` equals
//! the live tickets and stays within capacity; no order holds tickets twice or went through
//! a status twice; the api answered `202` or `503`, never another status and never later than
//! its time limit; it is ready again by itself. Each fault prints one summary line
//! (`fault … accepted … final … lost … oversold … duplicates …`), also appended to the file
//! named by `TURNSTILE_CHAOS_SUMMARY` when set.
//!
//! The process faults run in `make test`. The restarts stop and start the services, so they
//! are ignored there and run by `make chaos` (scripts/chaos.sh), which gives them a
//! PostgreSQL and a RabbitMQ of their own.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Process, TestApp};
use uuid::Uuid;

/// The api's request time limit in these tests; an answer later than this (plus a margin)
/// counts as a hang.
const REQUEST_TIMEOUT_SECS: u64 = 5;
const SETTLE: Duration = Duration::from_secs(120);
const CLIENTS: usize = 8;

/// How long the load runs before, during and after a fault (`CHAOS_PHASE_SECS`, default 2).
fn phase() -> Duration {
    let secs = std::env::var("CHAOS_PHASE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    Duration::from_secs(secs)
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Orders answered `202`, with their buyer's token.
    accepted: Vec<(Uuid, Arc<str>)>,
    statuses: BTreeMap<u16, u64>,
    /// Requests that got no complete answer (the api was gone: connection refused or reset).
    unanswered: u64,
    /// Requests not answered within the api's time limit and a margin.
    hung: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.accepted.extend(other.accepted);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.unanswered += other.unanswered;
        self.hung += other.hung;
    }
}

/// Buyers ordering one ticket at a time, round-robin over the events, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(app: &TestApp, events: &[Uuid], tokens: &[Arc<str>]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CLIENTS)
            .map(|k| {
                let (client, url, stop) = (app.client.clone(), app.url("/api/v1/orders"), stop.clone());
                let events = events.to_vec();
                let tokens: Vec<Arc<str>> = tokens.iter().skip(k).step_by(CLIENTS).cloned().collect();
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let limit = Duration::from_secs(REQUEST_TIMEOUT_SECS + 3);
                    for i in (k..).take_while(|_| !stop.load(Ordering::Relaxed)) {
                        let token = tokens[i % tokens.len()].clone();
                        let event = events[i % events.len()];
                        let started = Instant::now();
                        let sent = client
                            .post(&url)
                            .bearer_auth(&token)
                            .timeout(limit)
                            .json(&json!({"event_id": event, "quantity": 1}))
                            .send()
                            .await;
                        let answer = match sent {
                            Ok(res) => {
                                let status = res.status().as_u16();
                                res.json::<Value>().await.map(|body| (status, body))
                            }
                            Err(err) => Err(err),
                        };
                        match answer {
                            Ok((status, body)) => {
                                *tally.statuses.entry(status).or_default() += 1;
                                if status == 202 {
                                    let id = body["id"].as_str().and_then(|id| id.parse().ok()).expect("202 has an id");
                                    tally.accepted.push((id, token));
                                }
                            }
                            Err(err) if err.is_timeout() => tally.hung += 1,
                            Err(_) => {
                                tally.unanswered += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        if started.elapsed() > limit {
                            tally.hung += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    tally
                })
            })
            .collect();
        Load { stop, clients }
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut tally = Tally::default();
        for client in self.clients {
            tally.merge(client.await.expect("load client"));
        }
        tally
    }
}

/// An api (sold-out fast path off: every order goes through the queue and a worker), a few
/// events that sell out during the run, and buyers.
struct Chaos {
    app: TestApp,
    events: Vec<Uuid>,
    tokens: Vec<Arc<str>>,
}

impl Chaos {
    async fn new() -> Self {
        let app = TestApp::spawn_with(&[
            ("SOLD_OUT_FAST_PATH", "false".to_owned()),
            ("REQUEST_TIMEOUT_SECS", REQUEST_TIMEOUT_SECS.to_string()),
        ])
        .await;
        let admin = app.admin().await;
        let mut events = Vec::new();
        for _ in 0..3 {
            events.push(app.event_with(&admin, 50, 1).await);
        }
        let tokens = app.buyers(64).await.into_iter().map(|(_, token)| Arc::from(token)).collect();
        Chaos { app, events, tokens }
    }

    fn load(&self) -> Load {
        Load::start(&self.app, &self.events, &self.tokens)
    }

    /// Waits until every order is final and checks the promises; `may_go_unanswered` is for
    /// faults that take the api itself away.
    async fn settle_and_check(&self, fault: &str, tally: Tally, may_go_unanswered: bool) {
        let app = &self.app;
        wait_until_ready(app).await;
        app.wait_until_final(SETTLE).await;

        let ids: Vec<Uuid> = tally.accepted.iter().map(|(id, _)| *id).collect();
        let final_: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status <> 'QUEUED'")
            .bind(&ids)
            .fetch_one(&app.db.pool)
            .await
            .expect("count final orders");
        let lost = ids.len() as i64 - final_;
        let oversold: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE sold > capacity")
            .fetch_one(&app.db.pool)
            .await
            .expect("count oversold events");
        let duplicates: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM (SELECT order_id FROM tickets WHERE status = 'ACTIVE'
                                           GROUP BY order_id HAVING count(*) > 1) t)
                  + (SELECT count(*) FROM (SELECT order_id, status FROM order_history
                                           GROUP BY order_id, status HAVING count(*) > 1) h)",
        )
        .fetch_one(&app.db.pool)
        .await
        .expect("count duplicates");
        let line = format!(
            "fault {fault:<24} accepted {:>5}  final {final_:>5}  lost {lost}  oversold {oversold}  duplicates {duplicates}  \
             answers {:?}  unanswered {}  hung {}",
            ids.len(),
            tally.statuses,
            tally.unanswered,
            tally.hung
        );
        println!("{line}");
        if let Ok(path) = std::env::var("TURNSTILE_CHAOS_SUMMARY") {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("summary file");
            writeln!(file, "{line}").expect("write summary");
        }

        assert!(!ids.is_empty(), "{fault}: no order was accepted");
        assert_eq!(lost, 0, "{fault}: accepted orders missing or not final");
        assert_eq!(oversold, 0, "{fault}: oversold");
        assert_eq!(duplicates, 0, "{fault}: an order holds tickets twice or went through a status twice");
        for event in &self.events {
            let (capacity, sold) = app.assert_consistent(*event).await;
            assert_eq!(sold, capacity, "{fault}: demand exceeded capacity, so each event sells out");
        }
        let unexpected: Vec<_> = tally.statuses.keys().filter(|s| ![202, 503].contains(*s)).collect();
        assert!(unexpected.is_empty(), "{fault}: answers other than 202 and 503: {:?}", tally.statuses);
        assert_eq!(tally.hung, 0, "{fault}: requests went unanswered past the api's time limit");
        if !may_go_unanswered {
            assert_eq!(tally.unanswered, 0, "{fault}: the api dropped connections");
        }
        // Over the API too: a spread of the accepted orders, each read by its buyer.
        for (id, token) in tally.accepted.iter().step_by((ids.len() / 40).max(1)) {
            let res = app.get(&format!("/api/v1/orders/{id}"), Some(token)).await;
            assert_eq!(res.status, 200, "{fault}: {}", res.body);
            assert!(["PENDING", "REJECTED"].contains(&res.json["status"].as_str().unwrap_or_default()), "{}", res.body);
        }
    }
}

/// Waits until the api reports itself ready (database and broker reachable) again.
async fn wait_until_ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.get("/health/ready", None).await.status != 200 {
        assert!(Instant::now() < deadline, "the api did not become ready again by itself");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops or starts one of the services (`postgres`, `rabbitmq`) through scripts/services.sh.
/// Only under `make chaos`, whose services are these tests' own.
fn service(action: &str, which: &str) {
    assert!(
        std::env::var_os("TURNSTILE_CHAOS").is_some(),
        "this test stops and starts {which}: run it with `make chaos`, which gives it services of its own"
    );
    let script = tests::workspace_root().join("scripts/services.sh");
    let status = blocking(|| std::process::Command::new("bash").arg(script).args([action, which]).status())
        .expect("services.sh");
    assert!(status.success(), "services.sh {action} {which}: {status}");
}

/// Runs `work`, which blocks (waiting for a process), without stalling the load's clients:
/// they run on the runtime's other thread, and their latencies must not include this wait.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

async fn sleep(duration: Duration) {
    tokio::time::sleep(duration).await;
}

/// The worker stopped by `stop` under load, and another started after a while.
async fn worker_stopped_under_load(fault: &str, stop: impl FnOnce(&mut Process)) {
    let chaos = Chaos::new().await;
    let mut worker = chaos.app.spawn_worker(&[]);
    let load = chaos.load();
    worker.wait_for_log("batch committed", SETTLE, |_| true).await;
    sleep(phase()).await;
    blocking(|| stop(&mut worker));
    sleep(phase()).await;
    let _worker = blocking(|| chaos.app.spawn_worker(&[]));
    sleep(phase()).await;
    chaos.settle_and_check(fault, load.stop().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch() {
    worker_stopped_under_load("kill -9 worker", Process::kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_workers_killed() {
    let chaos = Chaos::new().await;
    let first = chaos.app.spawn_worker(&[]);
    let second = chaos.app.spawn_worker(&[]);
    let load = chaos.load();
    sleep(phase()).await;
    // Each partition has one active consumer; kill the worker that has been allocating.
    let (mut active, survivor) =
        if first.logs("batch committed").is_empty() { (second, first) } else { (first, second) };
    assert!(!active.logs("batch committed").is_empty(), "a worker allocates under load");
    blocking(|| active.kill());
    let before = survivor.logs("batch committed").len();
    sleep(phase() * 2).await;
    let tally = load.stop().await;
    chaos.settle_and_check("kill -9 one of 2 workers", tally, false).await;
    assert!(survivor.logs("batch committed").len() > before, "the survivor took over the partitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stopped_with_sigterm() {
    worker_stopped_under_load("SIGTERM worker", |worker| {
        let status = worker.terminate();
        assert!(status.is_some_and(|s| s.success()), "the worker stops cleanly on SIGTERM: {status:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stopped_with_sigterm() {
    let mut chaos = Chaos::new().await;
    let _worker = chaos.app.spawn_worker(&[]);
    let load = chaos.load();
    sleep(phase()).await;
    let status = blocking(|| chaos.app.terminate_api());
    assert!(status.is_some_and(|s| s.success()), "the api stops cleanly on SIGTERM: {status:?}");
    // Clients keep trying while it is gone (and are refused), then it comes back.
    sleep(phase() / 2).await;
    let tally = load.stop().await;
    blocking(|| chaos.app.restart_api());
    chaos.settle_and_check("SIGTERM api", tally, true).await;
}

/// An outage longer than the api's request time limit, so that requests waiting for the
/// dependency run out of time and must be answered `503`.
fn outage() -> Duration {
    Duration::from_secs(REQUEST_TIMEOUT_SECS + 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts RabbitMQ: run by `make chaos`"]
async fn rabbitmq_restarted_under_load() {
    let chaos = Chaos::new().await;
    let _worker = chaos.app.spawn_worker(&[]);
    let load = chaos.load();
    sleep(phase()).await;
    service("stop", "rabbitmq");
    let down = chaos.app.get("/health/ready", None).await;
    assert_eq!(down.status, 503, "the api reports the broker gone: {}", down.body);
    // Orders keep being accepted: they are stored, and re-published once the broker is back.
    sleep(outage()).await;
    service("start", "rabbitmq");
    sleep(phase()).await;
    chaos.settle_and_check("RabbitMQ restart", load.stop().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts PostgreSQL: run by `make chaos`"]
async fn postgres_restarted_under_load() {
    let chaos = Chaos::new().await;
    let _worker = chaos.app.spawn_worker(&[]);
    let load = chaos.load();
    sleep(phase()).await;
    service("stop", "postgres");
    let probe = tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(&chaos.app.db.pool)).await;
    assert!(!matches!(probe, Ok(Ok(_))), "PostgreSQL is down");
    sleep(outage()).await;
    service("start", "postgres");
    sleep(phase()).await;
    let tally = load.stop().await;
    let unavailable = tally.statuses.get(&503).copied().unwrap_or_default();
    chaos.settle_and_check("PostgreSQL restart", tally, false).await;
    assert!(unavailable > 0, "without its database the api answers 503");
}
