//! What a run cost, beside how fast it went: CPU time per process (sampled from `/proc`
//! while the run lasts), PostgreSQL statements (pg_stat_statements, reset at the start of
//! the run), rows written (the database's row counters in `pg_stat_database`, from the
//! start to the end of the run) and broker messages (RabbitMQ's management API).
//!
//! Every figure is optional: a run without the services' pid files or the superuser URL
//! (e.g. against a remote api) still reports its speed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

/// How often per-process CPU times are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Where to find the processes and the services' own views, from `make bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CostArgs {
    /// PostgreSQL's `postmaster.pid`: the postmaster and every backend (its children).
    /// Several, comma-separated, for a cluster: each member's, and the proxy's pid file
    /// (`make ha`: three Patroni members and HAProxy count as PostgreSQL).
    #[arg(long, env = "TURNSTILE_PG_PID_FILE", value_delimiter = ',')]
    pub pg_pid_file: Vec<PathBuf>,
    /// RabbitMQ's pid file (the `beam.smp` process and its children).
    #[arg(long, env = "TURNSTILE_RABBIT_PID_FILE")]
    pub rabbit_pid_file: Option<PathBuf>,
    /// A PostgreSQL superuser URL, to reset and read pg_stat_statements.
    #[arg(long, env = "TURNSTILE_PG_SUPERUSER_URL", hide_env_values = true)]
    pub pg_superuser_url: Option<String>,
    /// The RabbitMQ management URL (`http://user:password@host:port`), for message counts.
    #[arg(long, env = "RABBITMQ_MANAGEMENT_URL", hide_env_values = true)]
    pub rabbit_management_url: Option<String>,
    /// The virtual host the api and worker use (message counts are read for it).
    #[arg(long, default_value = "turnstile_bench")]
    pub vhost: String,
}

/// CPU seconds per process group over the run.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CpuSeconds {
    pub api: Option<f64>,
    pub worker: Option<f64>,
    pub postgres: Option<f64>,
    pub rabbitmq: Option<f64>,
    pub loadgen: Option<f64>,
}

impl CpuSeconds {
    pub fn total(&self) -> f64 {
        [self.api, self.worker, self.postgres, self.rabbitmq, self.loadgen].into_iter().flatten().sum()
    }

    /// `(name, seconds)` of every group measured.
    pub fn groups(&self) -> Vec<(&'static str, f64)> {
        [
            ("api", self.api),
            ("worker", self.worker),
            ("postgres", self.postgres),
            ("rabbitmq", self.rabbitmq),
            ("loadgen", self.loadgen),
        ]
        .into_iter()
        .filter_map(|(name, seconds)| seconds.map(|s| (name, s)))
        .collect()
    }
}

/// What the run cost, in all and per decided order.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Cost {
    /// Orders the cost is divided by: decided by the worker, or refused at once.
    pub decided_orders: u64,
    pub cpu_seconds: CpuSeconds,
    /// Microseconds of CPU per decided order, all measured processes together.
    pub cpu_us_per_order: Option<f64>,
    /// Top-level statements per decided order.
    pub statements_per_order: Option<f64>,
    /// Rows inserted, updated or deleted per decided order, by any statement (triggers' and
    /// data-modifying `WITH` clauses included).
    pub rows_written_per_order: Option<f64>,
    /// Messages published to the broker per decided order (purchase messages and order
    /// events).
    pub messages_per_order: Option<f64>,
    /// The statements that took the most execution time (top-level and nested).
    pub top_statements: Vec<Statement>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statement {
    pub query: String,
    pub calls: i64,
    pub rows: i64,
    /// Milliseconds of execution, lock waits included.
    pub total_ms: f64,
    pub toplevel: bool,
}

/// Samples CPU times until [`Sampler::finish`].
pub struct Sampler {
    args: CostArgs,
    /// The management API's count of messages published in the virtual host at the start
    /// (a virtual host made afresh may still show its predecessor's count for a moment).
    published_before: Option<u64>,
    /// The database's rows inserted, updated and deleted so far, at the start.
    written_before: Option<i64>,
    api_pid: Option<u32>,
    worker_pid: Option<u32>,
    database: String,
    ticks: Arc<Mutex<Ticks>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Per group: CPU ticks per pid at the start and last seen.
#[derive(Default)]
struct Ticks {
    first: HashMap<(&'static str, u32), u64>,
    last: HashMap<(&'static str, u32), u64>,
}

impl Sampler {
    /// Resets the database's statement statistics and starts sampling.
    pub async fn start(
        args: &CostArgs,
        api_pid: Option<u32>,
        worker_pid: Option<u32>,
        database: &str,
    ) -> anyhow::Result<Self> {
        let mut written_before = None;
        if let Some(url) = &args.pg_superuser_url {
            let mut conn = PgConnection::connect(url).await.context("connecting as the PostgreSQL superuser")?;
            reset_statements(&mut conn).await?;
            written_before = Some(rows_written(&mut conn, database).await?);
        }
        let published_before = match &args.rabbit_management_url {
            Some(url) => published(&reqwest::Client::new(), url, &args.vhost, false).await.ok(),
            None => None,
        };
        let ticks = Arc::new(Mutex::new(Ticks::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let groups = Groups {
            api: api_pid,
            worker: worker_pid,
            pg: args.pg_pid_file.clone(),
            rabbit: args.rabbit_pid_file.clone(),
        };
        let sampled = ticks.clone();
        // Every pid present now counts from now; pids that appear later count from zero.
        sample(&groups, &sampled, true);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
                let (groups, sampled) = (groups.clone(), sampled.clone());
                let _ = tokio::task::spawn_blocking(move || sample(&groups, &sampled, false)).await;
            }
            sample(&groups, &sampled, false);
        });
        Ok(Self {
            args: args.clone(),
            published_before,
            written_before,
            api_pid,
            worker_pid,
            database: database.to_owned(),
            ticks,
            stop,
            task,
        })
    }

    /// Stops sampling and gathers the statement and message counts.
    pub async fn finish(self, decided_orders: u64, http: &reqwest::Client) -> anyhow::Result<Cost> {
        let _ = self.stop.send(());
        let _ = self.task.await;
        let tick = clock_ticks_per_second();
        let cpu_seconds = {
            let ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
            let seconds = |group: &'static str| -> Option<f64> {
                let mut any = false;
                let mut total = 0u64;
                for ((g, pid), last) in &ticks.last {
                    if *g == group {
                        any = true;
                        total += last.saturating_sub(ticks.first.get(&(group, *pid)).copied().unwrap_or(0));
                    }
                }
                any.then(|| total as f64 / tick)
            };
            CpuSeconds {
                api: self.api_pid.and(seconds("api")),
                worker: self.worker_pid.and(seconds("worker")),
                postgres: seconds("postgres"),
                rabbitmq: seconds("rabbitmq"),
                loadgen: seconds("loadgen"),
            }
        };
        let per_order = |value: f64| (decided_orders > 0).then(|| value / decided_orders as f64);
        let mut cost = Cost {
            decided_orders,
            cpu_us_per_order: per_order(cpu_seconds.total() * 1e6),
            cpu_seconds,
            ..Cost::default()
        };
        if let Some(url) = &self.args.pg_superuser_url {
            let statements = statements(url, &self.database).await?;
            let top: i64 = statements.iter().filter(|s| s.toplevel).map(|s| s.calls).sum();
            cost.statements_per_order = per_order(top as f64);
            cost.top_statements = statements.into_iter().take(12).collect();
            if let Some(before) = self.written_before {
                // A session reports its counts at most once a second, and one that fell
                // idle within that second only after PostgreSQL's idle interval (10 s).
                tokio::time::sleep(STATS_SETTLE).await;
                let mut conn = PgConnection::connect(url).await?;
                cost.rows_written_per_order =
                    per_order((rows_written(&mut conn, &self.database).await? - before) as f64);
            }
        }
        if let Some(url) = &self.args.rabbit_management_url {
            match published(http, url, &self.args.vhost, true).await {
                Ok(messages) => {
                    let messages = messages.saturating_sub(self.published_before.unwrap_or(0));
                    cost.messages_per_order = per_order(messages as f64);
                }
                Err(err) => eprintln!("no message counts from the management API: {err:#}"),
            }
        }
        Ok(cost)
    }
}

#[derive(Clone)]
struct Groups {
    api: Option<u32>,
    worker: Option<u32>,
    pg: Vec<PathBuf>,
    rabbit: Option<PathBuf>,
}

/// Reads the CPU ticks of every process of every group.
fn sample(groups: &Groups, ticks: &Mutex<Ticks>, first: bool) {
    let processes = all_processes();
    let pid_file = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.lines().next().and_then(|line| line.trim().parse::<u32>().ok()))
    };
    let mut seen: Vec<(&'static str, u32, u64)> = Vec::new();
    let mut with_children = |group: &'static str, root: Option<u32>| {
        let Some(root) = root else { return };
        for (pid, parent, cpu) in &processes {
            if *pid == root || *parent == root {
                seen.push((group, *pid, *cpu));
            }
        }
    };
    with_children("api", groups.api);
    with_children("worker", groups.worker);
    for file in &groups.pg {
        with_children("postgres", pid_file(file));
    }
    with_children("rabbitmq", groups.rabbit.as_deref().and_then(pid_file));
    with_children("loadgen", Some(std::process::id()));
    let mut ticks = ticks.lock().unwrap_or_else(|e| e.into_inner());
    for (group, pid, cpu) in seen {
        if first {
            ticks.first.insert((group, pid), cpu);
        }
        ticks.last.insert((group, pid), cpu);
    }
}

/// `(pid, parent pid, utime + stime in ticks)` of every process.
fn all_processes() -> Vec<(u32, u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces: fields are counted after its `)`.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state(3) ppid(4) … utime(14) stime(15), so indices 1, 11 and 12.
        let parent = fields.get(1)?.parse().ok()?;
        let cpu = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((pid, parent, cpu))
    })
    .collect()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// How long after a run its sessions' row counts have all reached `pg_stat_database`.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// The database's rows inserted, updated and deleted so far, by every statement.
#[allow(clippy::disallowed_methods, reason = "pg_stat_database is a system view, outside the checked schema")]
async fn rows_written(conn: &mut PgConnection, database: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT (tup_inserted + tup_updated + tup_deleted)::int8 FROM pg_stat_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_one(&mut *conn)
    .await
}

/// Starts pg_stat_statements' counts afresh.
#[allow(
    clippy::disallowed_methods,
    reason = "pg_stat_statements is outside the schema the queries are checked against"
)]
async fn reset_statements(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&mut *conn).await?;
    sqlx::query("SELECT pg_stat_statements_reset()").execute(&mut *conn).await?;
    Ok(())
}

/// The database's statements, most time first.
#[allow(
    clippy::disallowed_methods,
    reason = "pg_stat_statements is outside the schema the queries are checked against"
)]
async fn statements(url: &str, database: &str) -> anyhow::Result<Vec<Statement>> {
    let mut conn = PgConnection::connect(url).await?;
    let rows: Vec<(String, i64, i64, f64, bool)> = sqlx::query_as(
        "SELECT s.query, s.calls, s.rows, s.total_exec_time, s.toplevel
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = $1 ORDER BY s.total_exec_time DESC",
    )
    .bind(database)
    .fetch_all(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(query, calls, rows, total_ms, toplevel)| Statement {
            query: query.split_whitespace().collect::<Vec<_>>().join(" "),
            calls,
            rows,
            total_ms,
            toplevel,
        })
        .collect())
}

/// Messages published in the virtual host, as the management API counts them (0 for a
/// virtual host it has no figures for yet). Its figures are refreshed every second: this
/// waits until two readings a second apart agree (and, with `nonzero`, are not 0).
async fn published(http: &reqwest::Client, management_url: &str, vhost: &str, nonzero: bool) -> anyhow::Result<u64> {
    let url = reqwest::Url::parse(management_url)?;
    let base = format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(15672));
    let (user, password) = (url.username().to_owned(), url.password().unwrap_or("guest").to_owned());
    let read = || async {
        let stats: serde_json::Value = http
            .get(format!("{base}/api/vhosts/{vhost}"))
            .basic_auth(&user, Some(&password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::Ok(stats["message_stats"]["publish"].as_u64().unwrap_or(0))
    };
    let mut previous = read().await?;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read().await?;
        if now == previous && (now > 0 || !nonzero) {
            return Ok(now);
        }
        previous = now;
    }
    Ok(previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_with_cpu_ticks() {
        let me = std::process::id();
        assert!(all_processes().iter().any(|(pid, _, _)| *pid == me));
    }
}
