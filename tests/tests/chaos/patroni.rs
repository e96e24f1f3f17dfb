//! Database faults on PostgreSQL as a Patroni cluster (three members, synchronous replication
//! in quorum mode, etcd, HAProxy routing to the leader), under a stampede on two api processes
//! and two workers, in the manner of Patroni's own Jepsen suite: processes killed with
//! `kill -9`, and a checker that no acknowledged write is lost. After each fault and its
//! healing: every accepted order final and none lost, nothing oversold or done twice, every
//! member streaming on the leader's timeline, the old leader rejoined, and the members agree
//! (counts and checksums of orders, tickets and order history read from each).
//!
//! `make chaos` runs them on the cluster that scripts/chaos.sh starts for its last phase;
//! with `--async-replication` (asynchronous standbys) the leader kill may lose acknowledged
//! orders, and the test reports what it saw instead of failing on it: the checker's own test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;
use tests::Process;

use super::{Chaos, SETTLE, blocking, longest_failing_run, phase, sleep, summary};

/// scripts/ha.sh with `args`, which must succeed; what it printed. Only under `make chaos`,
/// whose cluster this is.
fn ha_sh(args: &[&str]) -> String {
    let what = args.join(" ");
    assert!(
        std::env::var("TURNSTILE_PG_HA").as_deref() == Ok("1"),
        "this test runs `ha.sh {what}`: run it with `make chaos`, which gives it a Patroni cluster of its own"
    );
    let script = tests::workspace_root().join("scripts/ha.sh");
    let output = blocking(|| std::process::Command::new("bash").arg(script).args(args).output()).expect("ha.sh");
    assert!(output.status.success(), "ha.sh {what}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether the cluster replicates synchronously (the default) or not (`--async-replication`).
fn synchronous() -> bool {
    std::env::var("TURNSTILE_PG_HA_SYNC").as_deref() != Ok("off")
}

/// One member as Patroni's `GET /cluster` reports it.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    role: String,
    state: String,
    port: u16,
    timeline: u64,
}

fn members() -> Vec<Member> {
    let cluster: Value = serde_json::from_str(&ha_sh(&["cluster"])).expect("the cluster as JSON");
    cluster["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| Member {
                    name: m["name"].as_str().unwrap_or_default().to_owned(),
                    role: m["role"].as_str().unwrap_or_default().to_owned(),
                    state: m["state"].as_str().unwrap_or_default().to_owned(),
                    port: m["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or_default(),
                    timeline: m["timeline"].as_u64().unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn leader(members: &[Member]) -> Option<&Member> {
    members.iter().find(|m| m.role == "leader" && m.state == "running")
}

/// (Patroni's pid, the postmaster's pid) of a member.
fn pids(member: &str) -> (i32, i32) {
    let line = ha_sh(&["pids", member]);
    let mut pids = line.split_whitespace().map(|p| p.parse::<i32>().unwrap_or_default());
    let (patroni, postmaster) = (pids.next().unwrap_or_default(), pids.next().unwrap_or_default());
    assert!(patroni > 0 && postmaster > 0, "pids of {member}: {line}");
    (patroni, postmaster)
}

fn kill(signal: &str, pids: &[i32]) {
    let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
    let status =
        blocking(|| std::process::Command::new("kill").arg(format!("-{signal}")).args(&pids).status()).expect("kill");
    assert!(status.success(), "kill -{signal} {pids:?}");
}

/// Waits until the cluster has healed: a leader, the other two members streaming from it
/// on its timeline; returns the members.
async fn wait_until_healed() -> Vec<Member> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = members();
        if let Some(leader) = leader(&now) {
            let streaming = now
                .iter()
                .filter(|m| m.name != leader.name && m.state == "streaming" && m.timeline == leader.timeline)
                .count();
            if now.len() == 3 && streaming == 2 {
                return now;
            }
        }
        assert!(Instant::now() < deadline, "the cluster did not heal: {now:?}");
        sleep(Duration::from_millis(500)).await;
    }
}

/// Commits through HAProxy every 20 ms while the fault runs: the write-unavailable window is
/// the longest time from a failed commit to the next successful one.
struct WriteProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, bool)>>,
}

impl WriteProbe {
    fn start(url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, stopped) = (url.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            // When each commit was tried, and whether it failed.
            let mut commits = Vec::new();
            let mut conn: Option<sqlx::PgConnection> = None;
            while !stopped.load(Ordering::Relaxed) {
                let at = Instant::now();
                let committed = tokio::time::timeout(Duration::from_secs(2), async {
                    if conn.is_none() {
                        conn = Some(sqlx::PgConnection::connect(&url).await?);
                    }
                    let conn = conn.as_mut().expect("connected");
                    // Assigns a transaction id: the commit is a real one, replicated synchronously.
                    sqlx::query("SELECT txid_current()").execute(conn).await.map(|_| ())
                })
                .await;
                let failed = !matches!(committed, Ok(Ok(())));
                if failed {
                    conn = None;
                }
                commits.push((at, failed));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            commits
        });
        WriteProbe { stop, task }
    }

    /// Stops it; the write-unavailable window, from the first failed commit of the longest
    /// run of failures to the next successful one (or to the last, if none succeeded).
    async fn stop(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        longest_failing_run(&self.task.await.expect("write probe"))
    }
}

/// A connection to `url`, once its server accepts one (a member just started replays WAL
/// first, and refuses connections meanwhile).
async fn connect_when_up(url: &str) -> sqlx::PgConnection {
    let deadline = Instant::now() + SETTLE;
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(conn) => return conn,
            Err(err) => assert!(Instant::now() < deadline, "cannot connect to {url}: {err}"),
        }
        sleep(Duration::from_millis(250)).await;
    }
}

/// Counts and a checksum of the orders, tickets and status changes of the test's database,
/// read from each member directly once it has replayed everything the leader has written;
/// every member must give the same.
async fn members_agree(chaos: &Chaos, members: &[Member]) -> String {
    let database = chaos.app.db.url.rsplit('/').next().expect("a database name").to_owned();
    let leader = leader(members).expect("a leader").clone();
    let url = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/{database}");
    let mut leader_conn = sqlx::PgConnection::connect(&url(leader.port)).await.expect("connect to the leader");
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut leader_conn)
        .await
        .expect("the leader's position");
    let digest = "SELECT (SELECT count(*) FROM orders) || ' orders ' || (SELECT md5(coalesce(string_agg(id::text || status, ',' ORDER BY id), '')) FROM orders)
                  || ', ' || (SELECT count(*) FROM tickets) || ' tickets ' || (SELECT md5(coalesce(string_agg(id::text || status || order_id::text, ',' ORDER BY id), '')) FROM tickets)
                  || ', ' || (SELECT count(*) FROM order_status_changes) || ' changes ' || (SELECT md5(coalesce(string_agg(id::text || order_id::text || status, ',' ORDER BY id), '')) FROM order_status_changes)";
    let mut digests = Vec::new();
    for member in members {
        let mut conn = connect_when_up(&url(member.port)).await;
        if member.name != leader.name {
            let deadline = Instant::now() + SETTLE;
            loop {
                let caught_up: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(&written)
                    .fetch_one(&mut conn)
                    .await
                    .expect("replay position");
                if caught_up {
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not replay up to {written}", member.name);
                sleep(Duration::from_millis(100)).await;
            }
        }
        let digest: String = sqlx::query_scalar(digest).fetch_one(&mut conn).await.expect("a member's digest");
        digests.push((member.name.clone(), digest));
    }
    let first = digests[0].1.clone();
    assert!(digests.iter().all(|(_, d)| *d == first), "the members disagree: {digests:?}");
    first
}

/// What a fault does to the cluster, given its members before it.
type Inject = fn(&[Member]) -> Struck;

/// What a fault took down.
struct Struck {
    /// The member to start again once another leads, if the fault stopped one.
    restart: Option<String>,
    /// The member that must no longer lead, if the fault forces a failover.
    deposed: Option<String>,
    /// Processes stopped with SIGSTOP, continued once another member leads.
    frozen: Vec<i32>,
    /// Whether writes stop until another member leads (the api then reports itself not ready).
    outage: bool,
}

/// Waits until a leader runs that is not `deposed`; its name.
async fn wait_for_leader(deposed: Option<&str>) -> String {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = members();
        if let Some(leader) = leader(&now).filter(|l| Some(l.name.as_str()) != deposed) {
            return leader.name.clone();
        }
        assert!(Instant::now() < deadline, "no new leader: {now:?}");
        sleep(Duration::from_millis(250)).await;
    }
}

/// One database fault under a stampede: the load runs, `inject` strikes, the cluster fails
/// over (or not) and heals, the member taken down is started again, and every promise is
/// checked, the members' agreement included.
async fn fault_under_load(fault: &str, inject: Inject) {
    let mut chaos = Chaos::new().await;
    let (_other_api, other_base) = chaos.app.spawn_another_api();
    chaos.bases.push(other_base);
    chaos.hot = true;
    chaos.new_events(&[300, 40, 40]).await;
    let workers: Vec<Process> = (0..2).map(|_| chaos.app.spawn_worker(&[])).collect();
    for worker in &workers {
        worker.wait_for_log("partition assignment", SETTLE, |line| line["members"] == 2).await;
    }
    let before = wait_until_healed().await;
    let old_leader = leader(&before).expect("a leader").name.clone();

    let load = chaos.load();
    let probe = WriteProbe::start(&chaos.app.db.url);
    sleep(phase()).await;
    let struck = blocking(|| inject(&before));
    sleep(phase()).await;
    if struck.outage {
        let ready = chaos.app.get("/health/ready", None).await;
        assert_eq!(ready.status, 503, "{fault}: the api reports its database gone: {}", ready.body);
    }
    // A failover waits out the leader key's ttl (20 s) first.
    let failover = Instant::now();
    wait_for_leader(struck.deposed.as_deref()).await;
    let failover = failover.elapsed() + phase();
    if !struck.frozen.is_empty() {
        // The zombie wakes up believing it leads, until its Patroni finds its key gone.
        kill("CONT", &struck.frozen);
    }
    if let Some(victim) = &struck.restart {
        // The load runs a while without the member, then it comes back.
        sleep(phase()).await;
        ha_sh(&["start-member", victim]);
    }
    let healed = wait_until_healed().await;
    sleep(phase()).await;
    let window = probe.stop().await;
    let tallies = load.stop().await;
    let new_leader = leader(&healed).expect("a leader").name.clone();
    // Once every order is decided nothing writes to what is compared.
    chaos.app.wait_until_final(SETTLE).await;
    let agreed = members_agree(&chaos, &healed).await;
    summary(&format!(
        "{fault}: leader {old_leader} -> {new_leader}, leading {:.1} s after the fault; writes unavailable for {:.1} s; \
         healed, members agree ({agreed})",
        failover.as_secs_f64(),
        window.as_secs_f64()
    ));
    if synchronous() {
        chaos.settle_and_check(fault, tallies, None).await;
    } else {
        chaos.report(fault, tallies).await;
    }
}

/// `kill -9` of the leader's Patroni and postmaster together; it returns as a replica
/// (rewound if it had diverged).
fn kill_leader(members: &[Member]) -> Struck {
    let leader = leader(members).expect("a leader").name.clone();
    let (patroni, postmaster) = pids(&leader);
    kill("KILL", &[patroni, postmaster]);
    Struck { restart: Some(leader.clone()), deposed: Some(leader), frozen: Vec::new(), outage: true }
}

/// `kill -9` of the leader's postmaster alone: its Patroni sees PostgreSQL gone and starts
/// it again (crash recovery), or lets another member take over.
fn kill_leader_postmaster(members: &[Member]) -> Struck {
    let leader = leader(members).expect("a leader").name.clone();
    let (_, postmaster) = pids(&leader);
    kill("KILL", &[postmaster]);
    Struck { restart: None, deposed: None, frozen: Vec::new(), outage: false }
}

/// `kill -9` of a synchronous standby's Patroni and postmaster: the other standby acknowledges
/// commits meanwhile.
fn kill_sync_standby(members: &[Member]) -> Struck {
    let standby = members
        .iter()
        .find(|m| m.role == "sync_standby" || m.role == "quorum_standby")
        .expect("a synchronous standby")
        .name
        .clone();
    let (patroni, postmaster) = pids(&standby);
    kill("KILL", &[patroni, postmaster]);
    Struck { restart: Some(standby), deposed: None, frozen: Vec::new(), outage: false }
}

/// The leader's Patroni and all of its PostgreSQL processes stopped with SIGSTOP past the
/// leader key's ttl, then continued: a "zombie" primary, which must not take writes.
fn freeze_leader(members: &[Member]) -> Struck {
    let leader = leader(members).expect("a leader").name.clone();
    let (patroni, postmaster) = pids(&leader);
    let children = std::process::Command::new("pgrep").args(["-P", &postmaster.to_string()]).output().expect("pgrep");
    let mut frozen = vec![patroni, postmaster];
    frozen.extend(String::from_utf8_lossy(&children.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    kill("STOP", &frozen);
    Struck { restart: None, deposed: Some(leader), frozen, outage: true }
}

/// A planned switchover (`patronictl switchover`) to a synchronous standby.
fn switchover(members: &[Member]) -> Struck {
    let leader = leader(members).expect("a leader").name.clone();
    let candidate =
        members.iter().find(|m| m.name != leader && m.state == "streaming").expect("a standby").name.clone();
    ha_sh(&["patronictl", "switchover", "--leader", &leader, "--candidate", &candidate, "--force"]);
    Struck { restart: None, deposed: Some(leader), frozen: Vec::new(), outage: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the PostgreSQL leader: run by `make chaos`, on a Patroni cluster"]
async fn patroni_leader_killed_under_load() {
    fault_under_load("kill -9 PostgreSQL leader", kill_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the PostgreSQL leader's postmaster: run by `make chaos`, on a Patroni cluster"]
async fn patroni_leader_postmaster_killed_under_load() {
    fault_under_load("kill -9 leader's postmaster", kill_leader_postmaster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills a PostgreSQL standby: run by `make chaos`, on a Patroni cluster"]
async fn patroni_sync_standby_killed_under_load() {
    fault_under_load("kill -9 synchronous standby", kill_sync_standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "freezes the PostgreSQL leader: run by `make chaos`, on a Patroni cluster"]
async fn patroni_zombie_leader_under_load() {
    fault_under_load("SIGSTOP leader past its ttl", freeze_leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "switches the PostgreSQL leader over: run by `make chaos`, on a Patroni cluster"]
async fn patroni_switchover_under_load() {
    fault_under_load("patronictl switchover", switchover).await;
}
