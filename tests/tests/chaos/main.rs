//! Faults under a steady purchase load: the worker killed mid-batch, one of two workers
//! killed, api and worker stopped with SIGTERM, workers joining, leaving and dying, RabbitMQ
//! and PostgreSQL restarted; and, on RabbitMQ as a cluster of three nodes with two api
//! processes and three workers, broker nodes and an api process killed.
//!
//! After each fault the load stops, the system settles, and the promises are checked in SQL
//! and over the API: every order that got `202` exists and is final; per event `sold` equals
//! the live tickets and stays within capacity; no order holds tickets twice or went through
//! a status twice; the api answered `202` or `503`, never another status and never later than
//! its time limit; an api process the fault left up never dropped a connection; it is ready
//! again by itself. Each fault prints one summary line (`fault … accepted … final … lost …
//! oversold … duplicates … longest 5xx blip …`), also appended to the file named by
//! `TURNSTILE_CHAOS_SUMMARY` when set.
//!
//! The process faults run in `make test`. The restarts stop and start the services, so they
//! are ignored there and run by `make chaos` (scripts/chaos.sh), which gives them a
//! PostgreSQL and a RabbitMQ of their own, then the same RabbitMQ as a cluster of three nodes
//! for the cluster faults. `make test` runs that script too (`--restarts-only`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Process, TestApp};

mod patroni;
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

/// What the clients of one api process saw.
#[derive(Default)]
struct Tally {
    /// Orders answered `202`, with their buyer's token.
    accepted: Vec<(Uuid, Arc<str>)>,
    statuses: BTreeMap<u16, u64>,
    /// Requests that got no complete answer (the api was gone: connection refused or reset).
    unanswered: u64,
    /// Requests not answered within the api's time limit and a margin.
    hung: u64,
    /// Every answered request: when it was sent, and whether the answer was a 5xx.
    answers: Vec<(Instant, bool)>,
}

impl Tally {
    /// What every api process's clients saw, together, and the longest 5xx blip of any one
    /// process (blips are per process: one copy answering 5xx while another answers is
    /// still a blip).
    fn total(tallies: Vec<Tally>) -> (Tally, Duration) {
        let blip = tallies.iter().map(Tally::longest_blip).max().unwrap_or_default();
        let mut total = Tally::default();
        for tally in tallies {
            total.merge(tally);
        }
        (total, blip)
    }

    fn merge(&mut self, other: Tally) {
        self.accepted.extend(other.accepted);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.unanswered += other.unanswered;
        self.hung += other.hung;
        self.answers.extend(other.answers);
    }

    /// The longest time this api answered nothing but 5xx (see [`longest_failing_run`]).
    fn longest_blip(&self) -> Duration {
        longest_failing_run(&self.answers)
    }
}

/// The longest run of failures among `attempts` (when each was made, whether it failed):
/// from the first failed attempt of a run to the next attempt that succeeded, or to the
/// last attempt if none did.
fn longest_failing_run(attempts: &[(Instant, bool)]) -> Duration {
    let mut attempts = attempts.to_vec();
    attempts.sort_by_key(|(at, _)| *at);
    let (mut longest, mut run_start) = (Duration::ZERO, None);
    for (at, failed) in &attempts {
        match (failed, run_start) {
            (true, None) => run_start = Some(*at),
            (false, Some(start)) => {
                longest = longest.max(at.duration_since(start));
                run_start = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some((last, _))) = (run_start, attempts.last()) {
        longest = longest.max(last.duration_since(start));
    }
    longest
}

/// Buyers ordering one ticket at a time until stopped, each request to the next api
/// process in turn (as a load balancer spreads them). Without a hot event the orders go
/// round-robin over the events; with one (a stampede), three orders in four go to the first.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<Tally>>>,
}

impl Load {
    fn start(client: &reqwest::Client, bases: &[String], events: &[Uuid], tokens: &[Arc<str>], hot: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = bases.iter().map(|base| format!("{base}/api/v1/orders")).collect();
        let clients = (0..CLIENTS)
            .map(|k| {
                let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
                let events = events.to_vec();
                let tokens: Vec<Arc<str>> = tokens.iter().skip(k).step_by(CLIENTS).cloned().collect();
                tokio::spawn(async move {
                    let mut tallies: Vec<Tally> = urls.iter().map(|_| Tally::default()).collect();
                    let limit = Duration::from_secs(REQUEST_TIMEOUT_SECS + 3);
                    for i in (k..).take_while(|_| !stop.load(Ordering::Relaxed)) {
                        let token = tokens[i % tokens.len()].clone();
                        // The api by `i`, the event by `j`, so that every api gets every event.
                        let (api, j) = (i % urls.len(), i / urls.len());
                        let event = match hot {
                            true if j % 4 != 3 || events.len() == 1 => events[0],
                            true => events[1 + (j / 4) % (events.len() - 1)],
                            false => events[j % events.len()],
                        };
                        let tally = &mut tallies[api];
                        let started = Instant::now();
                        let sent = client
                            .post(&urls[api])
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
                                tally.answers.push((started, status >= 500));
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
                    tallies
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients; what they saw, per api process.
    async fn stop(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        let mut tallies: Vec<Tally> = Vec::new();
        for client in self.clients {
            for (api, tally) in client.await.expect("load client").into_iter().enumerate() {
                if tallies.len() <= api {
                    tallies.push(Tally::default());
                }
                tallies[api].merge(tally);
            }
        }
        tallies
    }
}

/// An api (sold-out fast path off: every order goes through the queue and a worker), a few
/// events that sell out during the run, and buyers.
struct Chaos {
    app: TestApp,
    /// Where the load goes: the app's api, and any other api processes.
    bases: Vec<String>,
    events: Vec<Uuid>,
    tokens: Vec<Arc<str>>,
    admin: String,
    /// Whether the load is a stampede on the first event.
    hot: bool,
}

impl Chaos {
    async fn new() -> Self {
        let app = TestApp::spawn_process_with(&[
            ("SOLD_OUT_FAST_PATH", "false".to_owned()),
            ("QUEUE_DEMAND_FACTOR", "0".to_owned()),
            ("REQUEST_TIMEOUT_SECS", REQUEST_TIMEOUT_SECS.to_string()),
        ])
        .await;
        let admin = app.admin().await;
        let tokens = app.buyers(64).await.into_iter().map(|(_, token)| Arc::from(token)).collect();
        let mut chaos = Chaos { bases: vec![app.base.clone()], app, events: Vec::new(), tokens, admin, hot: false };
        chaos.new_events(&[50, 50, 50]).await;
        chaos
    }

    /// Replaces the events the load buys with new ones of these capacities.
    async fn new_events(&mut self, capacities: &[i64]) {
        self.events.clear();
        for capacity in capacities {
            self.events.push(self.app.event_with(&self.admin, *capacity, 1).await);
        }
    }

    fn load(&self) -> Load {
        Load::start(&self.app.client, &self.bases, &self.events, &self.tokens, self.hot)
    }

    /// Waits until every order is final and checks the promises. `gone`: the api process
    /// (by its place in `bases`) that the fault takes away, whose clients may go unanswered.
    async fn settle_and_check(&self, fault: &str, tallies: Vec<Tally>, gone: Option<usize>) {
        let app = &self.app;
        wait_until_ready(app).await;
        app.wait_until_final(SETTLE).await;

        let dropped: Vec<u64> = tallies.iter().map(|t| t.unanswered).collect();
        let (tally, blip) = Tally::total(tallies);
        let ids: Vec<Uuid> = tally.accepted.iter().map(|(id, _)| *id).collect();
        let verdict = Verdict::of(&app.db.pool, &ids).await;
        summary(&verdict.line(fault, &tally, blip));

        assert!(!ids.is_empty(), "{fault}: no order was accepted");
        assert_eq!(verdict.lost, 0, "{fault}: accepted orders missing or not final");
        assert_eq!(verdict.oversold, 0, "{fault}: oversold");
        assert_eq!(verdict.duplicates, 0, "{fault}: an order holds tickets twice or went through a status twice");
        for event in &self.events {
            let (capacity, sold) = app.assert_consistent(*event).await;
            assert_eq!(sold, capacity, "{fault}: demand exceeded capacity, so each event sells out");
        }
        let unexpected: Vec<_> = tally.statuses.keys().filter(|s| ![202, 503].contains(*s)).collect();
        assert!(unexpected.is_empty(), "{fault}: answers other than 202 and 503: {:?}", tally.statuses);
        assert_eq!(tally.hung, 0, "{fault}: requests went unanswered past the api's time limit");
        for (api, dropped) in dropped.iter().enumerate() {
            if gone != Some(api) {
                assert_eq!(*dropped, 0, "{fault}: api process {api}, which stayed up, dropped connections");
            }
        }
        // Over the API too: a spread of the accepted orders, each read by its buyer.
        for (id, token) in tally.accepted.iter().step_by((ids.len() / 40).max(1)) {
            let res = app.get(&format!("/api/v1/orders/{id}"), Some(token)).await;
            assert_eq!(res.status, 200, "{fault}: {}", res.body);
            assert!(["PENDING", "REJECTED"].contains(&res.json["status"].as_str().unwrap_or_default()), "{}", res.body);
        }
    }
}

impl Chaos {
    /// Waits until every order is final and reports what the checker finds, without
    /// asserting it: for a fault that may lose orders by design (asynchronous replication).
    async fn report(&self, fault: &str, tallies: Vec<Tally>) {
        wait_until_ready(&self.app).await;
        self.app.wait_until_final(SETTLE).await;
        let (tally, blip) = Tally::total(tallies);
        let ids: Vec<Uuid> = tally.accepted.iter().map(|(id, _)| *id).collect();
        let verdict = Verdict::of(&self.app.db.pool, &ids).await;
        summary(&format!("{} (reported, not asserted)", verdict.line(fault, &tally, blip)));
    }
}

/// What the checker finds in the database for the orders answered `202`.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    accepted: i64,
    /// Accepted orders that exist and were decided.
    final_: i64,
    /// Accepted orders missing, or never decided.
    lost: i64,
    /// Events that sold more than their capacity.
    oversold: i64,
    /// Orders holding tickets twice, or that went through a status twice.
    duplicates: i64,
}

impl Verdict {
    async fn of(pool: &sqlx::PgPool, accepted: &[Uuid]) -> Self {
        let final_: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status <> 'QUEUED'")
            .bind(accepted)
            .fetch_one(pool)
            .await
            .expect("count final orders");
        let oversold: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE sold > capacity")
            .fetch_one(pool)
            .await
            .expect("count oversold events");
        let duplicates: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM (SELECT order_id FROM tickets WHERE status = 'ACTIVE'
                                           GROUP BY order_id HAVING count(*) > 1) t)
                  + (SELECT count(*) FROM (SELECT order_id, status FROM order_status_changes
                                           GROUP BY order_id, status HAVING count(*) > 1) h)",
        )
        .fetch_one(pool)
        .await
        .expect("count duplicates");
        let accepted = accepted.len() as i64;
        Verdict { accepted, final_, lost: accepted - final_, oversold, duplicates }
    }

    /// The fault's summary line.
    fn line(&self, fault: &str, tally: &Tally, blip: Duration) -> String {
        format!(
            "fault {fault:<26} accepted {:>5}  final {:>5}  lost {}  oversold {}  duplicates {}  \
             longest 5xx blip {:.1} s  answers {:?}  unanswered {}  hung {}",
            self.accepted,
            self.final_,
            self.lost,
            self.oversold,
            self.duplicates,
            blip.as_secs_f64(),
            tally.statuses,
            tally.unanswered,
            tally.hung
        )
    }
}

/// The checker can fail: an accepted order deleted behind its back is reported lost, one
/// left `QUEUED` too, and an event sold past its capacity is reported oversold.
#[tokio::test]
async fn the_checker_reports_lost_and_oversold() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 1).await;
    let buyers = app.buyers(4).await;
    let mut accepted = Vec::new();
    for (_, token) in &buyers {
        accepted.push(app.pending_order(token, event, 1).await);
    }
    let pool = &app.db.pool;
    let clean = Verdict::of(pool, &accepted).await;
    assert_eq!(clean, Verdict { accepted: 4, final_: 4, lost: 0, oversold: 0, duplicates: 0 });

    // One accepted order disappears (as a commit lost in a failover would), another is
    // back to QUEUED and never decided.
    for sql in [
        "DELETE FROM order_history WHERE order_id = $1",
        "DELETE FROM tickets WHERE order_id = $1",
        "DELETE FROM orders WHERE id = $1",
    ] {
        sqlx::query(sql).bind(accepted[0]).execute(pool).await.unwrap();
    }
    sqlx::query("UPDATE orders SET status = 'QUEUED' WHERE id = $1").bind(accepted[1]).execute(pool).await.unwrap();
    let broken = Verdict::of(pool, &accepted).await;
    assert_eq!((broken.final_, broken.lost), (2, 2), "{broken:?}");

    // Past capacity (the schema's CHECK refuses it: dropped in the test's own database).
    sqlx::query("ALTER TABLE events DROP CONSTRAINT events_sold_within_capacity").execute(pool).await.unwrap();
    sqlx::query("UPDATE events SET sold = capacity + 1 WHERE id = $1").bind(event).execute(pool).await.unwrap();
    assert_eq!(Verdict::of(pool, &accepted).await.oversold, 1);
}

/// Prints a line of the fault summary, and appends it to `TURNSTILE_CHAOS_SUMMARY`'s file.
fn summary(line: &str) {
    println!("{line}");
    if let Ok(path) = std::env::var("TURNSTILE_CHAOS_SUMMARY") {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("summary file");
        writeln!(file, "{line}").expect("write summary");
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
    services_sh(&[action, which]);
}

/// Runs scripts/services.sh with `args` and requires it to succeed. Only under `make chaos`,
/// whose services are these tests' own.
fn services_sh(args: &[&str]) {
    let what = args.join(" ");
    assert!(
        std::env::var_os("TURNSTILE_CHAOS").is_some(),
        "this test runs `services.sh {what}`: run it with `make chaos`, which gives it services of its own"
    );
    let script = tests::workspace_root().join("scripts/services.sh");
    let status = blocking(|| std::process::Command::new("bash").arg(script).args(args).status()).expect("services.sh");
    assert!(status.success(), "services.sh {what}: {status}");
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
    chaos.settle_and_check(fault, load.stop().await, None).await;
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
    chaos.settle_and_check("kill -9 one of 2 workers", tally, None).await;
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
    chaos.app.restart_api().await;
    chaos.settle_and_check("SIGTERM api", tally, Some(0)).await;
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
    chaos.settle_and_check("RabbitMQ restart", load.stop().await, None).await;
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
    let unavailable: u64 = tally.iter().map(|t| t.statuses.get(&503).copied().unwrap_or_default()).sum();
    chaos.settle_and_check("PostgreSQL restart", tally, None).await;
    assert!(unavailable > 0, "without its database the api answers 503");
}

/// The number of purchase partitions (the api's and worker's default).
const PARTITIONS: u16 = 8;

/// Kills (`kill -9`) or starts one RabbitMQ node of `make chaos`'s cluster, by node name.
fn node(action: &str, name: &str) {
    services_sh(&[action, "rabbitmq-node", name]);
}

/// A partition queue's state as the management API reports it (from any live node).
async fn queue(app: &TestApp, name: &str) -> Value {
    app.broker.management().get(&format!("/api/queues/{}/{name}", app.broker.vhost)).await
}

fn names(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Waits until every partition queue has a leader and all three of its replicas online:
/// a restarted node has rejoined and caught up.
async fn wait_until_rejoined(app: &TestApp) -> Duration {
    let started = Instant::now();
    for k in 0..PARTITIONS {
        loop {
            let q = queue(app, &common::amqp::purchase_queue(k)).await;
            if names(&q["online"]).len() == 3 && q["leader"].is_string() {
                break;
            }
            assert!(started.elapsed() < SETTLE, "partition {k} did not get its three replicas back: {q}");
            sleep(Duration::from_millis(250)).await;
        }
    }
    started.elapsed()
}

/// A RabbitMQ node killed under a stampede and started again, once it has rejoined.
/// Reports how long the hot event's partition went without a committed batch meanwhile.
async fn node_killed_under_load(chaos: &Chaos, workers: &[Process], fault: &str, victim: &str) {
    let hot = common::amqp::partition_of(chaos.events[0], PARTITIONS);
    let load = chaos.load();
    sleep(phase()).await;
    let killed_at = chrono::Utc::now();
    node("kill", victim);
    sleep(phase() * 2).await;
    let started = Instant::now();
    node("start", victim);
    let restart = started.elapsed();
    let rejoined = wait_until_rejoined(&chaos.app).await;
    sleep(phase()).await;
    let tally = load.stop().await;
    let mut decided: Vec<chrono::DateTime<chrono::Utc>> = workers
        .iter()
        .flat_map(|w| w.logs("batch committed"))
        .filter(|line| line["partition"].as_u64() == Some(u64::from(hot)))
        .map(|line| logged_at(&line))
        .filter(|at| *at >= killed_at)
        .collect();
    decided.sort();
    let pause = std::iter::once(killed_at)
        .chain(decided)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[1] - w[0]).to_std().unwrap_or_default())
        .max()
        .unwrap_or_default();
    let line = format!(
        "{fault}: {victim} killed; the hot partition's longest pause between batches {:.2} s; the node started in \
         {:.1} s and every queue had its three replicas {:.1} s later",
        pause.as_secs_f64(),
        restart.as_secs_f64(),
        rejoined.as_secs_f64()
    );
    summary(&line);
    chaos.settle_and_check(fault, tally, None).await;
}

/// RabbitMQ as a cluster of three nodes, two api processes and three workers, a stampede on
/// one event: the node leading the hot partition's queue is killed (`kill -9`) and started
/// again; once it has rejoined, another node likewise; then one api process. After each, the
/// promises hold, and the longest run of 5xx answers is reported; requests to the api
/// process that stays up never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills RabbitMQ nodes: run by `make chaos`, on a cluster of three"]
async fn cluster_nodes_and_an_api_killed_under_load() {
    let mut chaos = Chaos::new().await;
    assert_eq!(
        chaos.app.services.management_urls.len(),
        3,
        "RabbitMQ runs as one node: `make chaos` runs this test on a cluster of three"
    );
    let (mut other_api, other_base) = chaos.app.spawn_another_api();
    chaos.bases.push(other_base);
    chaos.hot = true;
    let workers: Vec<Process> = (0..3).map(|_| chaos.app.spawn_worker(&[])).collect();
    for worker in &workers {
        worker.wait_for_log("partition assignment", SETTLE, |line| line["members"] == 3).await;
    }
    // Every partition queue has a replica on each node.
    for k in 0..PARTITIONS {
        let q = queue(&chaos.app, &common::amqp::purchase_queue(k)).await;
        assert_eq!(names(&q["members"]).len(), 3, "partition {k}: {q}");
    }

    // The node that leads the hot event's partition queue. (Capacities such that the events
    // sell out while the node is down or rejoining, and demand still exceeds them.)
    chaos.new_events(&[1000, 100, 100]).await;
    let hot_queue =
        |chaos: &Chaos| common::amqp::purchase_queue(common::amqp::partition_of(chaos.events[0], PARTITIONS));
    let first = queue(&chaos.app, &hot_queue(&chaos)).await["leader"].as_str().expect("a leader").to_owned();
    node_killed_under_load(&chaos, &workers, "kill -9 hot leader node", &first).await;

    // Another node: the new hot queue's leader, unless that is the node just restarted.
    chaos.new_events(&[1000, 100, 100]).await;
    let hot = queue(&chaos.app, &hot_queue(&chaos)).await;
    let second = std::iter::once(hot["leader"].as_str().unwrap_or_default().to_owned())
        .chain(names(&hot["members"]))
        .find(|name| !name.is_empty() && *name != first)
        .expect("another node");
    node_killed_under_load(&chaos, &workers, "kill -9 another node", &second).await;

    // One of the two api processes, behind the load.
    chaos.new_events(&[300, 40, 40]).await;
    let load = chaos.load();
    sleep(phase()).await;
    blocking(|| other_api.kill());
    sleep(phase() * 2).await;
    let tallies = load.stop().await;
    let survivor = &tallies[0];
    assert_eq!(
        (survivor.statuses.keys().copied().collect::<Vec<_>>(), survivor.unanswered, survivor.hung),
        (vec![202], 0, 0),
        "requests to the api process that stayed up failed: {:?}",
        survivor.statuses
    );
    chaos.settle_and_check("kill -9 one of 2 apis", tallies, Some(1)).await;
}

/// When a log line was written (its `timestamp`).
fn logged_at(line: &Value) -> chrono::DateTime<chrono::Utc> {
    line["timestamp"].as_str().and_then(|t| t.parse().ok()).expect("a log line has a timestamp")
}

/// Which of `workers` committed batches of each partition after `since`.
fn committers(workers: &[&Process], since: chrono::DateTime<chrono::Utc>) -> BTreeMap<u16, Vec<usize>> {
    let mut seen: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (w, worker) in workers.iter().enumerate() {
        for line in worker.logs("batch committed") {
            let Some(partition) = line["partition"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
            if logged_at(&line) > since && !seen.get(&partition).is_some_and(|ws| ws.contains(&w)) {
                seen.entry(partition).or_default().push(w);
            }
        }
    }
    seen
}

/// The partitions a worker prefers, from its latest `partition assignment` line.
fn preferred(worker: &Process) -> Vec<u16> {
    let line = worker.logs("partition assignment").pop().expect("an assignment");
    // Logged as text (`"[0, 3, 6]"`), which is JSON.
    let list: Value = line["preferred"].as_str().and_then(|text| serde_json::from_str(text).ok()).expect("preferred");
    list.as_array().expect("a list").iter().filter_map(|p| p.as_u64()?.try_into().ok()).collect()
}

/// Waits until `workers` all count `members` live workers and, over a second of load, each
/// partition's batches were committed by exactly one worker: the one that prefers it.
/// Returns the partitions of each worker.
async fn wait_for_shares(workers: &[&Process], members: usize) -> Vec<Vec<u16>> {
    for worker in workers {
        worker.wait_for_log("partition assignment", SETTLE, |line| line["members"] == members).await;
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let since = chrono::Utc::now();
        sleep(Duration::from_secs(1)).await;
        let seen = committers(workers, since);
        let shares: Vec<Vec<u16>> = workers.iter().map(|w| preferred(w)).collect();
        // Every worker counts the same members now (a heartbeat late under load can make one
        // count fewer for a moment), and each partition went to the one that prefers it.
        let agreed =
            workers.iter().all(|w| w.logs("partition assignment").pop().is_some_and(|line| line["members"] == members));
        let settled = agreed
            && (0..PARTITIONS).all(|k| seen.get(&k).is_some_and(|ws| ws.len() == 1 && shares[ws[0]].contains(&k)));
        if settled {
            return shares;
        }
        assert!(Instant::now() < deadline, "the partitions were not shared out as preferred: {seen:?}, {shares:?}");
    }
}

/// Events until every partition has one (an event's partition is a hash of its id).
async fn events_on_every_partition(chaos: &mut Chaos, capacity: i64) {
    let mut by_partition: BTreeMap<u16, Uuid> = BTreeMap::new();
    while by_partition.len() < usize::from(PARTITIONS) {
        let event = chaos.app.event_with(&chaos.admin, capacity, 1).await;
        by_partition.entry(common::amqp::partition_of(event, PARTITIONS)).or_insert(event);
    }
    chaos.events = by_partition.into_values().collect();
}

/// Three workers share the partitions under load; a fourth joining takes its share; one
/// leaving (SIGTERM) hands its partitions over; one killed (`kill -9`) loses them to the
/// others, and how long its partitions went without a consumer is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_leave_and_die_under_load() {
    let mut chaos = Chaos::new().await;
    events_on_every_partition(&mut chaos, 50).await;
    let mut workers: Vec<Process> = (0..3).map(|_| chaos.app.spawn_worker(&[])).collect();
    let load = chaos.load();
    let shares = wait_for_shares(&workers.iter().collect::<Vec<_>>(), 3).await;
    assert!(shares.iter().all(|s| [2, 3].contains(&s.len())), "three workers share eight partitions 3/3/2: {shares:?}");

    workers.push(blocking(|| chaos.app.spawn_worker(&[])));
    let shares = wait_for_shares(&workers.iter().collect::<Vec<_>>(), 4).await;
    assert!(shares.iter().all(|s| s.len() == 2), "four workers have two partitions each: {shares:?}");

    let mut leaving = workers.remove(0);
    let status = blocking(|| leaving.terminate());
    assert!(status.is_some_and(|s| s.success()), "the worker stops cleanly on SIGTERM: {status:?}");
    let shares = wait_for_shares(&workers.iter().collect::<Vec<_>>(), 3).await;

    // kill -9 the worker with the most partitions; the others take them over.
    let victim = (0..workers.len()).max_by_key(|w| shares[*w].len()).expect("a worker");
    let orphans = shares[victim].clone();
    let mut dead = workers.remove(victim);
    let killed_at = chrono::Utc::now();
    blocking(|| dead.kill());
    let survivors: Vec<&Process> = workers.iter().collect();
    let deadline = Instant::now() + SETTLE;
    let gap = loop {
        let seen = committers(&survivors, killed_at);
        let firsts: Option<Vec<chrono::DateTime<chrono::Utc>>> = orphans
            .iter()
            .map(|k| {
                survivors
                    .iter()
                    .flat_map(|w| w.logs("batch committed"))
                    .filter(|l| l["partition"].as_u64() == Some(u64::from(*k)) && logged_at(l) > killed_at)
                    .map(|l| logged_at(&l))
                    .min()
            })
            .collect();
        if let Some(firsts) = firsts {
            break firsts.into_iter().max().map(|t| (t - killed_at).to_std().unwrap_or_default()).unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the killed worker's partitions {orphans:?} were not taken over: {seen:?}");
        sleep(Duration::from_millis(100)).await;
    };
    wait_for_shares(&survivors, 2).await;
    let tally = load.stop().await;
    let line = format!(
        "workers 3 -> 4 -> 3 -> 2: after kill -9 of a worker its partitions {orphans:?} were decided again by the others within {:.2} s",
        gap.as_secs_f64()
    );
    summary(&line);
    chaos.settle_and_check("workers join, leave, die", tally, None).await;
}
