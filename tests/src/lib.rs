//! Test harness for the end-to-end tests: every test gets its own PostgreSQL database, its
//! own RabbitMQ virtual host and its own api on a random port, so tests run in parallel and
//! leave nothing behind.
//!
//! The api runs in the test's own process ([`TestApp::spawn`]: `api::Application`, the
//! library the binary runs), or as the real binary where a test needs a process: its logs,
//! its metrics, its pid, signals, or several apis at once ([`TestApp::spawn_process`]).
//! Workers too: in-process ([`TestApp::worker`]: `worker::Worker`, with settings changed by
//! type and polling loops a test can step), or as processes ([`TestApp::spawn_worker`]),
//! which tests kill, signal and read the logs and metrics of.
//!
//! The services come from `scripts/services.sh start` (which `make test` runs); their URLs
//! are read from the environment or, failing that, from the env file that script writes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef012345";
pub const TICKET_SECRET: &str = "test-ticket-secret-0123456789abcdef0123456";
pub const PASSWORD: &str = "correct horse battery";

/// The URLs of the local services.
#[derive(Clone, Debug)]
pub struct Services {
    pub database_url: String,
    /// One AMQP URL, or a cluster's nodes' URLs comma-separated.
    pub amqp_url: String,
    /// The management API of each node (one unless RabbitMQ runs as a cluster).
    pub management_urls: Vec<String>,
}

impl Services {
    pub fn from_env() -> Self {
        let file = env_file_values();
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| file.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                .unwrap_or_else(|| {
                    panic!("{name} is not set: start the services with `make services` (or run `make test`)")
                })
        };
        let management = std::env::var("RABBITMQ_MANAGEMENT_URLS")
            .ok()
            .or_else(|| file.iter().find(|(k, _)| k == "RABBITMQ_MANAGEMENT_URLS").map(|(_, v)| v.clone()))
            .unwrap_or_else(|| get("RABBITMQ_MANAGEMENT_URL"));
        Services {
            database_url: get("DATABASE_URL"),
            amqp_url: get("AMQP_URL"),
            management_urls: management
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `KEY=value` pairs of the env file written by `scripts/services.sh` (found by asking it).
fn env_file_values() -> Vec<(String, String)> {
    let path = std::env::var("TURNSTILE_ENV_FILE").map(PathBuf::from).ok().or_else(|| {
        let out = Command::new("bash").arg(workspace_root().join("scripts/services.sh")).arg("env").output().ok()?;
        Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else { return Vec::new() };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ").unwrap_or(line.trim()).split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Path of a workspace binary next to the running test executable (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(format!("TURNSTILE_{}_BIN", name.to_uppercase())) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first with `cargo build --bins` (make test does)", path.display());
    path
}

/// A fresh database, dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// A database with the schema: a copy of a template migrated once per set of migrations
    /// (the processes the tests start find nothing left to migrate).
    pub async fn create(services: &Services) -> Self {
        let template = migrated_template(&services.database_url).await;
        Self::create_from(services, &format!("TEMPLATE {template}")).await
    }

    /// A database without the schema, for the tests of migrating one.
    pub async fn empty(services: &Services) -> Self {
        Self::create_from(services, "").await
    }

    async fn create_from(services: &Services, options: &str) -> Self {
        let name = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&services.database_url).await.expect("connect to PostgreSQL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name} {options}")))
            .await
            .expect("create test database");
        let url = database_url(&services.database_url, &name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.expect("connect");
        TestDb { url, pool, name, admin_url: services.database_url.clone() }
    }
}

/// The URL of database `name` on the server of `admin_url`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, _) = admin_url.rsplit_once('/').expect("DATABASE_URL has a database name");
    format!("{base}/{name}")
}

/// The name of a database migrated with these migrations (their versions and checksums
/// name it), made once by whichever test gets there first, under an advisory lock: built
/// under a name of its own and renamed when complete, so a test that was killed halfway
/// leaves no half-migrated template behind.
async fn migrated_template(admin_url: &str) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for migration in common::db::MIGRATOR.iter() {
        digest.update(migration.version.to_le_bytes());
        digest.update(&*migration.checksum);
    }
    let hash = digest.finalize();
    let name = format!("t_template_{}", hash.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>());
    let mut admin = sqlx::PgConnection::connect(admin_url).await.expect("connect to PostgreSQL");
    let key = i64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
    sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut admin).await.expect("lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .expect("look for the template");
    if !exists {
        let building = format!("{name}_building");
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)")))
            .await
            .expect("drop an unfinished template");
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {building}"))).await.expect("create the template");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url(admin_url, &building))
            .await
            .expect("connect to the template");
        common::db::MIGRATOR.run(&pool).await.expect("migrate the template");
        pool.close().await;
        admin
            .execute(sqlx::AssertSqlSafe(format!("ALTER DATABASE {building} RENAME TO {name}")))
            .await
            .expect("name the template");
    }
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut admin).await.expect("unlock");
    name
}

impl TestDb {
    /// Drops the database now, closing its connections (`WITH (FORCE)`): whoever uses it
    /// from then on is told it does not exist.
    pub async fn drop_now(&self) {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await.expect("connect to PostgreSQL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", self.name)))
            .await
            .expect("drop the test database");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        clean_up(async move {
            let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
            admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await.ok()
        });
    }
}

/// Runs a clean-up from `Drop`, which may run outside any runtime (or inside one that must
/// not be blocked): on a thread of its own with a runtime of its own, waited for.
fn clean_up<T>(work: impl std::future::Future<Output = Option<T>> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        runtime.block_on(work).map(|_| ())
    })
    .join();
}

/// A fresh RabbitMQ virtual host (so each test has its own queues), deleted when dropped.
pub struct TestBroker {
    /// AMQP URL of the virtual host: one per node, comma-separated, when RabbitMQ runs as a
    /// cluster (api and worker take the list).
    pub url: String,
    pub vhost: String,
    management: Management,
}

/// The RabbitMQ management HTTP API of every node (credentials taken from the URLs): a
/// request goes to the first node that answers, so it works while a node is down.
#[derive(Clone)]
pub struct Management {
    nodes: Vec<(String, String, String)>,
}

impl Management {
    pub fn new(urls: &[String]) -> Self {
        let nodes = urls
            .iter()
            .map(|url| {
                let parsed = reqwest::Url::parse(url).expect("RABBITMQ_MANAGEMENT_URL is a URL");
                let base = format!(
                    "{}://{}:{}",
                    parsed.scheme(),
                    parsed.host_str().expect("management host"),
                    parsed.port_or_known_default().expect("management port")
                );
                let user = if parsed.username().is_empty() { "guest".to_owned() } else { parsed.username().to_owned() };
                (base, user, parsed.password().unwrap_or("guest").to_owned())
            })
            .collect();
        Management { nodes }
    }

    fn user(&self) -> &str {
        &self.nodes[0].1
    }

    /// Sends the request to each node in turn until one answers (any status).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<reqwest::Response> {
        // A client per call: the drop of a `TestBroker` calls from a runtime of its own, where
        // a client's pooled connections (tied to the runtime that opened them) cannot run.
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let mut last = None;
        for (base, user, password) in &self.nodes {
            let mut request = client.request(method.clone(), format!("{base}{path}")).basic_auth(user, Some(password));
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => return Ok(response),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one management URL"))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let response = self.send(method, path, body.as_ref()).await.expect("RabbitMQ management API reachable");
        assert!(response.status().is_success(), "management API {path}: {}", response.status());
        response
    }

    /// `GET path`, parsed.
    pub async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await.json().await.expect("management API answers JSON")
    }
}

impl TestBroker {
    pub async fn create(services: &Services) -> Self {
        let management = Management::new(&services.management_urls);
        let vhost = format!("t_{}", Uuid::new_v4().simple());
        management.call(reqwest::Method::PUT, &format!("/api/vhosts/{vhost}"), None).await;
        let permissions = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let path = format!("/api/permissions/{vhost}/{}", management.user());
        management.call(reqwest::Method::PUT, &path, Some(permissions)).await;
        let urls: Vec<String> = services
            .amqp_url
            .split(',')
            .map(|url| {
                let (base, _) = url.trim().rsplit_once('/').expect("AMQP_URL ends with a vhost");
                format!("{base}/{vhost}")
            })
            .collect();
        TestBroker { url: urls.join(","), vhost, management }
    }

    /// The management API of the broker's nodes.
    pub fn management(&self) -> &Management {
        &self.management
    }

    /// Number of messages ready in a queue of this virtual host (asked over AMQP, which is
    /// exact at once, unlike the management API's sampled statistics).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = channel
            .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0);
        let _ = connection.close(200, "done".into()).await;
        depth
    }

    /// A connection to this virtual host (on the first node that accepts it), for tests
    /// that publish or consume themselves.
    pub async fn connect(&self) -> lapin::Connection {
        let mut last = None;
        for url in self.url.split(',') {
            match lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await {
                Ok(connection) => return connection,
                Err(err) => last = Some(err),
            }
        }
        panic!("AMQP connection: {last:?}")
    }
}

/// A queue of the test's own (exclusive to `connection`), bound to the `orders.events`
/// exchange with `routing_key` (`order.#` for every order event), and a consumer of it.
pub async fn bind_order_events(connection: &lapin::Connection, routing_key: &str) -> lapin::Consumer {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("declare a queue");
    channel
        .queue_bind(
            queue.name().clone(),
            "orders.events".into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it to orders.events");
    channel
        .basic_consume(queue.name().clone(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume it")
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let (management, vhost) = (self.management.clone(), self.vhost.clone());
        clean_up(
            async move { management.send(reqwest::Method::DELETE, &format!("/api/vhosts/{vhost}"), None).await.ok() },
        );
    }
}

/// A running process whose JSON log lines are forwarded to the test's output.
pub struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts `binary` with `args` and `envs`; when `ready_message` is given, waits for a log
    /// line with that message and returns it parsed.
    pub fn spawn(
        name: &str,
        args: &[&str],
        envs: &[(&str, String)],
        ready_message: Option<&str>,
    ) -> (Self, Option<Value>) {
        let mut command = Command::new(binary(name));
        command
            .args(args)
            .current_dir(std::env::temp_dir())
            .env("RUST_LOG", "info")
            // Many processes at once: each serves its metrics on a port of its own.
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env_remove("LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (tx, rx) = mpsc::channel::<Value>();
        let wanted = ready_message.map(str::to_owned);
        let stdout = child.stdout.take().expect("piped stdout");
        let label = name.to_owned();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let captured = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                let Ok(value) = serde_json::from_str::<Value>(&line) else { continue };
                if let Some(wanted) = &wanted
                    && value["message"] == wanted.as_str()
                {
                    let _ = tx.send(value.clone());
                }
                captured.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{label} stderr] {line}");
            }
        });
        let mut process = Process { child, logs };
        let ready = ready_message.map(|message| {
            rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                let status = process.child.try_wait().ok().flatten();
                panic!("{name} did not log {message:?} within 60 s (exit status: {status:?}); see its output above")
            })
        });
        (process, ready)
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().ok()?;
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Waits (up to `timeout`) for the process to exit by itself; its exit status.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no clean-up, no goodbye (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every JSON log line printed so far.
    pub fn all_logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the process serves its metrics (`METRICS_ADDR`), from its `metrics listening`
    /// log line: `http://host:port`.
    pub fn metrics_base(&self) -> String {
        let line = self.logs("metrics listening").into_iter().next().expect("a `metrics listening` log line");
        format!("http://{}", line["addr"].as_str().expect("metrics listening line has addr"))
    }

    /// The JSON log lines printed so far whose `message` is `message`.
    pub fn logs(&self, message: &str) -> Vec<Value> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter().filter(|line| line["message"] == message).cloned().collect()
    }

    /// Waits (up to `timeout`) for a log line with `message` that satisfies `check`.
    pub async fn wait_for_log(&self, message: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs(message).into_iter().find(|line| check(line)) {
                return line;
            }
            assert!(tokio::time::Instant::now() < deadline, "no {message:?} log line as expected within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a workspace binary to completion and returns (success, stdout, stderr).
pub fn run(name: &str, args: &[&str], envs: &[(&str, String)], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut command = Command::new(binary(name));
    command
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("JWT_SECRET")
        .env_remove("WEBHOOK_SECRET")
        .env_remove("TICKET_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().expect("wait for process");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An api built in the test's process, stopped when dropped.
pub struct InProcessApi {
    shutdown: CancellationToken,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessApi {
    /// Builds the api from `env` (the variables its binary would read) and starts it on
    /// the test's runtime; returns it with its base URL.
    async fn start(env: &[(String, String)]) -> (Self, String) {
        let shutdown = CancellationToken::new();
        let application =
            api::Application::build(api_config(env), shutdown.clone()).await.expect("building the api in-process");
        let base = format!("http://{}", application.addr());
        let running = tokio::spawn(application.run_until_stopped());
        (InProcessApi { shutdown, running: Some(running) }, base)
    }

    /// Stops it as SIGTERM would, and waits for its tasks; their result.
    pub async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.shutdown.cancel();
        let running = self.running.take()?;
        Some(running.await.unwrap_or_else(|err| Err(anyhow::anyhow!("the api panicked: {err}"))))
    }
}

impl Drop for InProcessApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }
}

/// The `ApiConfig` the api binary would read from `env` (see [`config_from_env`]).
fn api_config(env: &[(String, String)]) -> common::config::ApiConfig {
    config_from_env("api", env)
}

/// The configuration a binary would read from `env`: each variable becomes the flag that
/// reads it (so that the test's own environment cannot override it).
fn config_from_env<C: clap::Args>(binary: &str, env: &[(String, String)]) -> C {
    #[derive(clap::Parser)]
    struct Flags<C: clap::Args> {
        #[command(flatten)]
        config: C,
    }
    let command = <Flags<C> as clap::CommandFactory>::command();
    // As in an environment, a variable set again replaces the earlier value.
    let mut settings: Vec<(&str, &str)> = Vec::new();
    for (key, value) in env {
        settings.retain(|(set, _)| set != key);
        settings.push((key, value));
    }
    let mut args = vec![binary.to_owned()];
    for (key, value) in settings {
        let flag = command
            .get_arguments()
            .find(|arg| arg.get_env() == Some(std::ffi::OsStr::new(key)))
            .and_then(|arg| arg.get_long())
            .unwrap_or_else(|| panic!("no {binary} setting reads {key}: start the {binary} as a process to pass it"));
        args.push(format!("--{flag}={value}"));
    }
    <Flags<C> as clap::Parser>::try_parse_from(args).unwrap_or_else(|err| panic!("{binary} settings: {err}")).config
}

/// A worker built in the test's process (`worker::Worker`, the library the binary runs),
/// stopped when dropped: for tests where a worker's decisions, not its process, are the
/// point. Its polling loops can be stepped ([`Self::steps`]) instead of slept past.
pub struct InProcessWorker {
    shutdown: CancellationToken,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    steps: worker::Steps,
}

impl InProcessWorker {
    /// Builds the worker, starts it on the test's runtime and waits until it is subscribed
    /// to every partition.
    async fn start(config: common::config::WorkerConfig) -> Self {
        let shutdown = CancellationToken::new();
        let built = worker::Worker::build(config, shutdown.clone()).await.expect("building the worker in-process");
        let (steps, mut ready) = (built.steps(), built.ready());
        let running = tokio::spawn(built.run_until_stopped());
        let subscribed = tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|ready| *ready)).await;
        assert!(subscribed.is_ok_and(|r| r.is_ok()), "the worker did not subscribe to its partitions within 60 s");
        InProcessWorker { shutdown, running: Some(running), steps }
    }

    /// Runs rounds of its polling loops now: `worker.steps().expiry().await` returns once
    /// the holds due are expired.
    pub fn steps(&self) -> &worker::Steps {
        &self.steps
    }

    /// Stops it as SIGTERM would, and waits for its tasks; their result.
    pub async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.shutdown.cancel();
        let running = self.running.take()?;
        Some(running.await.unwrap_or_else(|err| Err(anyhow::anyhow!("the worker panicked: {err}"))))
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }
}

/// How a test's api runs.
enum Api {
    InProcess(InProcessApi),
    Process(Process),
}

/// The api, serving a database of its own.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub broker: TestBroker,
    pub services: Services,
    api: Api,
    /// The api's environment, to start it again.
    api_env: Vec<(String, String)>,
    /// The api's image store (a directory of this test's own), removed at the end.
    pub images: PathBuf,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.images);
    }
}

impl TestApp {
    /// The api in the test's process.
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// The api in the test's process, with extra settings (e.g. a small body limit), named
    /// by the environment variables the binary reads.
    pub async fn spawn_with(extra_env: &[(&str, String)]) -> Self {
        Self::start(extra_env, true).await
    }

    /// The api as the real binary, in a process of its own.
    pub async fn spawn_process() -> Self {
        Self::spawn_process_with(&[]).await
    }

    /// The api binary, with extra environment variables.
    pub async fn spawn_process_with(extra_env: &[(&str, String)]) -> Self {
        Self::start(extra_env, false).await
    }

    /// A database and a virtual host of the test's own, and the api on them.
    async fn start(extra_env: &[(&str, String)], in_process: bool) -> Self {
        let services = Services::from_env();
        let db = TestDb::create(&services).await;
        let broker = TestBroker::create(&services).await;
        let images = std::env::temp_dir().join(format!("turnstile-images-{}", db.name));
        let mut envs = vec![
            ("DATABASE_URL", db.url.clone()),
            ("AMQP_URL", broker.url.clone()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("TICKET_SECRET", TICKET_SECRET.to_owned()),
            ("IMAGE_STORE", images.display().to_string()),
            ("BIND_ADDR", "127.0.0.1:0".to_owned()),
            ("DATABASE_MAX_CONNECTIONS", "10".to_owned()),
            // Many apis at once: each serves its metrics on a port of its own.
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            // Webhook receivers in tests listen on loopback.
            ("WEBHOOK_ALLOW_NETWORKS", "127.0.0.1/32".to_owned()),
        ];
        envs.extend(extra_env.iter().cloned());
        let api_env: Vec<(String, String)> = envs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client");
        let (api, base) = Self::launch(&api_env, in_process).await;
        TestApp { base, client, db, broker, services, api, api_env, images }
    }

    /// Starts the api, in-process or as a process, with its base URL.
    async fn launch(env: &[(String, String)], in_process: bool) -> (Api, String) {
        if in_process {
            let (api, base) = InProcessApi::start(env).await;
            (Api::InProcess(api), base)
        } else {
            let (process, base) = Self::start_api(env);
            (Api::Process(process), base)
        }
    }

    /// The api's process, for what only a process has.
    fn process(&self) -> &Process {
        match &self.api {
            Api::Process(process) => process,
            Api::InProcess(_) => panic!("this needs the api's process: start the test with TestApp::spawn_process"),
        }
    }

    fn process_mut(&mut self) -> &mut Process {
        match &mut self.api {
            Api::Process(process) => process,
            Api::InProcess(_) => panic!("this needs the api's process: start the test with TestApp::spawn_process"),
        }
    }

    /// Starts an api process and returns it with its base URL.
    fn start_api(env: &[(String, String)]) -> (Process, String) {
        let envs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (api, ready) = Process::spawn("api", &["serve"], &envs, Some("listening"));
        let addr = ready.and_then(|v| v["addr"].as_str().map(str::to_owned)).expect("listening line has addr");
        (api, format!("http://{addr}"))
    }

    /// The api's JSON log lines so far.
    pub fn api_logs(&self) -> Vec<Value> {
        self.process().all_logs()
    }

    /// Where the api serves its metrics (`METRICS_ADDR`): `http://host:port`.
    pub fn api_metrics_base(&self) -> String {
        self.process().metrics_base()
    }

    /// The api's process id (e.g. to read its memory from `/proc`).
    pub fn api_pid(&self) -> u32 {
        self.process().id()
    }

    /// Starts another api process on this test's database and virtual host, as a second copy
    /// behind a load balancer would run; returns it with its base URL.
    pub fn spawn_another_api(&self) -> (Process, String) {
        Self::start_api(&self.api_env)
    }

    /// Starts another api process like [`Self::spawn_another_api`], with some settings
    /// replaced (`extra_env`).
    pub fn spawn_another_api_with(&self, extra_env: &[(&str, String)]) -> (Process, String) {
        let mut env = self.api_env.clone();
        env.extend(extra_env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self::start_api(&env)
    }

    /// Waits (up to `timeout`) for the api to exit by itself; its exit status.
    pub async fn wait_for_api_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process_mut().wait_for_exit(timeout).await
    }

    /// Stops the api with SIGTERM (a graceful shutdown) and returns its exit status.
    pub fn terminate_api(&mut self) -> Option<std::process::ExitStatus> {
        self.process_mut().terminate()
    }

    /// Starts the api again, with the same settings (on a new port: `base` changes): the
    /// process is killed first; the in-process api is stopped as on SIGTERM.
    pub async fn restart_api(&mut self) {
        self.stop_api().await;
        let in_process = matches!(self.api, Api::InProcess(_));
        (self.api, self.base) = Self::launch(&self.api_env, in_process).await;
    }

    /// The settings of this test's workers: its database and virtual host, short intervals.
    fn worker_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.db.url.clone()),
            ("AMQP_URL", self.broker.url.clone()),
            ("DATABASE_MAX_CONNECTIONS", "10".to_owned()),
            ("HEARTBEAT_MS", "200".to_owned()),
            ("REPUBLISH_INTERVAL_MS", "200".to_owned()),
            ("REPUBLISH_AFTER_SECS", "1".to_owned()),
            ("EVENTS_RELAY_INTERVAL_MS", "50".to_owned()),
            ("WEBHOOK_POLL_INTERVAL_MS", "50".to_owned()),
            ("WEBHOOK_RETRY_SCHEDULE", "300ms,300ms,300ms".to_owned()),
            ("WEBHOOK_ALLOW_NETWORKS", "127.0.0.1/32".to_owned()),
        ]
    }

    /// Starts a worker process on this test's database and virtual host, with short
    /// intervals, and waits until it is subscribed to every partition. `extra_env`
    /// overrides settings. For tests that need the process: its logs, its metrics, signals,
    /// kills; otherwise [`Self::worker`].
    pub fn spawn_worker(&self, extra_env: &[(&str, String)]) -> Process {
        let mut envs = self.worker_env();
        envs.extend(extra_env.iter().cloned());
        Process::spawn("worker", &[], &envs, Some("worker ready")).0
    }

    /// A worker in the test's process with the settings of [`Self::spawn_worker`], ready
    /// (subscribed to every partition).
    pub async fn worker(&self) -> InProcessWorker {
        self.worker_with(|_| {}).await
    }

    /// A worker in the test's process whose settings `configure` changes first, e.g.
    /// `app.worker_with(|c| c.batch_size = 5)`.
    pub async fn worker_with(&self, configure: impl FnOnce(&mut common::config::WorkerConfig)) -> InProcessWorker {
        let env: Vec<(String, String)> = self.worker_env().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let mut config: common::config::WorkerConfig = config_from_env("worker", &env);
        // Many workers in parallel tests: each serves its metrics on a port of its own.
        config.metrics_addr = "127.0.0.1:0".parse().expect("an address");
        configure(&mut config);
        InProcessWorker::start(config).await
    }

    /// `n` users inserted straight into the database (skipping argon2, which is not what
    /// these tests are about) with tokens signed by the api's key: (id, token).
    pub async fn buyers(&self, n: usize) -> Vec<(Uuid, String)> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let emails: Vec<String> = ids.iter().map(|id| format!("buyer-{}@example.com", id.simple())).collect();
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash)
             SELECT id, email, 'Buyer', 'not-a-password-hash' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
        )
        .bind(&ids)
        .bind(&emails)
        .execute(&self.db.pool)
        .await
        .expect("insert buyers");
        ids.into_iter().map(|id| (id, mint_token(id, "user"))).collect()
    }

    /// Waits until no order of this test's database is `QUEUED` (panics after `timeout`).
    pub async fn wait_until_final(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'QUEUED'")
                .fetch_one(&self.db.pool)
                .await
                .expect("count queued orders");
            if queued == 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{queued} orders still QUEUED after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The invariants that must hold for every event whatever happened: `sold` equals the
    /// live tickets and stays within capacity, every `PENDING` or `PAID` order holds exactly
    /// its quantity of live tickets, no other order holds any, and no ticket id repeats.
    /// Returns (capacity, sold).
    pub async fn assert_consistent(&self, event: Uuid) -> (i64, i64) {
        let (capacity, sold): (i32, i32) = sqlx::query_as("SELECT capacity, sold FROM events WHERE id = $1")
            .bind(event)
            .fetch_one(&self.db.pool)
            .await
            .expect("read event");
        let (tickets, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT id) FROM tickets WHERE event_id = $1 AND status = 'ACTIVE'",
        )
        .bind(event)
        .fetch_one(&self.db.pool)
        .await
        .expect("count tickets");
        assert_eq!(tickets, distinct, "duplicate ticket ids");
        assert_eq!(i64::from(sold), tickets, "sold counter differs from live tickets");
        assert!(sold <= capacity, "oversold: {sold} > {capacity}");
        let mismatched: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(
            "SELECT o.id, o.status, o.quantity, count(t.id) FILTER (WHERE t.status = 'ACTIVE')
             FROM orders o LEFT JOIN tickets t ON t.order_id = o.id
             WHERE o.event_id = $1 GROUP BY o.id
             HAVING count(t.id) FILTER (WHERE t.status = 'ACTIVE')
                    <> CASE WHEN o.status IN ('PENDING', 'PAID') THEN o.quantity ELSE 0 END",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare tickets with orders");
        assert!(mismatched.is_empty(), "orders whose live tickets do not match their status: {mismatched:?}");
        // Per ticket type: `sold` equals its live tickets, within its own capacity, and the
        // types' `sold` add up to the event's.
        let types: Vec<(Uuid, Option<i32>, i32, i64)> = sqlx::query_as(
            "SELECT tt.id, tt.capacity, tt.sold, count(t.id) FILTER (WHERE t.status = 'ACTIVE')
             FROM ticket_types tt LEFT JOIN tickets t ON t.ticket_type_id = tt.id
             WHERE tt.event_id = $1 GROUP BY tt.id",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("count tickets per type");
        for (id, capacity, type_sold, live) in &types {
            assert_eq!(i64::from(*type_sold), *live, "type {id}: sold differs from its live tickets");
            assert!(capacity.is_none_or(|c| *type_sold <= c), "type {id} oversold: {type_sold} > {capacity:?}");
        }
        let types_sold: i64 = types.iter().map(|(_, _, sold, _)| i64::from(*sold)).sum();
        assert_eq!(types_sold, i64::from(sold), "the types' sold do not add up to the event's");
        // Every live order holds its lines' tickets, type by type, and its quantity is their sum.
        let off_lines: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT o.id FROM orders o
             WHERE o.event_id = $1 AND o.status IN ('PENDING', 'PAID')
               AND (o.quantity <> (SELECT sum((l->>'quantity')::int) FROM json_array_elements(o.lines) l)
                    OR EXISTS (
                        SELECT 1 FROM json_array_elements(o.lines) l
                        WHERE (l->>'quantity')::int <> (SELECT count(*) FROM tickets t WHERE t.order_id = o.id
                              AND t.status = 'ACTIVE' AND t.ticket_type_id = (l->>'ticket_type_id')::uuid)))",
        )
        .bind(event)
        .fetch_all(&self.db.pool)
        .await
        .expect("compare tickets with order lines");
        assert!(off_lines.is_empty(), "orders whose tickets do not match their lines: {off_lines:?}");
        (i64::from(capacity), i64::from(sold))
    }

    /// Buys `quantity` tickets and waits until the order is `PENDING` (a worker must run).
    pub async fn pending_order(&self, token: &str, event_id: Uuid, quantity: i64) -> Uuid {
        let res = self.order(token, event_id, quantity, None).await;
        assert_eq!(res.status, 202, "{}", res.body);
        let id: Uuid = res.json["id"].as_str().expect("order id").parse().expect("uuid");
        // `status=QUEUED`: answer as soon as the order is anything else, even if that
        // happened before this request.
        let res = self.get(&format!("/api/v1/orders/{id}?wait=30&status=QUEUED"), Some(token)).await;
        assert_eq!(res.json["status"], "PENDING", "{}", res.body);
        id
    }

    /// The payment provider's webhook for `order_id`, signed with the api's key under a new
    /// webhook id, now.
    pub async fn payment(&self, order_id: Uuid, body: &Value) -> Response {
        let body = body.to_string();
        let id = format!("msg_{}", Uuid::new_v4().simple());
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign_webhook(WEBHOOK_SECRET.as_bytes(), &id, timestamp, &body);
        self.raw_payment(
            order_id,
            &body,
            &[("webhook-id", id), ("webhook-timestamp", timestamp.to_string()), ("webhook-signature", signature)],
        )
        .await
    }

    /// `POST /api/v1/orders/{id}/status` with exactly this body and these headers.
    pub async fn raw_payment(
        &self,
        order_id: impl std::fmt::Display,
        body: &str,
        headers: &[(&str, String)],
    ) -> Response {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/orders/{order_id}/status")))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// `POST /api/v1/orders` with an optional Idempotency-Key.
    pub async fn order(&self, token: &str, event_id: Uuid, quantity: i64, key: Option<&str>) -> Response {
        let mut request = self
            .client
            .post(self.url("/api/v1/orders"))
            .bearer_auth(token)
            .json(&json!({"event_id": event_id, "quantity": quantity}));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// Creates an event with `capacity` and `max_per_order`, without a buyer cap (lifted on
    /// purpose: the stampedes that use it let few buyers place many orders), and returns its
    /// id. [`TestApp::create_event`] leaves the cap to its default.
    pub async fn event_with(&self, admin_token: &str, capacity: i64, max_per_order: i64) -> Uuid {
        let body = json!({"capacity": capacity, "max_per_order": max_per_order, "max_per_buyer": null});
        let res = self.create_event(admin_token, body).await;
        assert_eq!(res.status, 201, "{}", res.body);
        res.json["id"].as_str().expect("event id").parse().expect("uuid")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the api (e.g. to check what survives it): the process is killed, the
    /// in-process api stopped.
    pub async fn stop_api(&mut self) {
        match &mut self.api {
            Api::Process(process) => process.kill(),
            Api::InProcess(api) => {
                api.stop().await;
            }
        }
    }

    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn patch(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut request = self.client.patch(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.delete(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// Signs a user up and returns (id, email).
    pub async fn signup(&self, name: &str) -> (Uuid, String) {
        let email = format!("{}-{}@example.com", name.to_lowercase(), Uuid::new_v4().simple());
        let res = self.post("/api/v1/signup", &json!({"name": name, "email": email, "password": PASSWORD}), None).await;
        assert_eq!(res.status, 201, "signup failed: {}", res.body);
        (res.json["id"].as_str().expect("id").parse().expect("uuid"), email)
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post("/api/v1/login", &json!({"email": email, "password": password}), None).await
    }

    /// Signs a user up, logs in and returns (id, token).
    pub async fn user(&self, name: &str) -> (Uuid, String) {
        let (id, email) = self.signup(name).await;
        (id, self.token_for(&email).await)
    }

    pub async fn token_for(&self, email: &str) -> String {
        let res = self.login(email, PASSWORD).await;
        assert_eq!(res.status, 200, "login failed: {}", res.body);
        res.json["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Creates an admin through the real `api create-admin` subcommand and returns a token.
    pub async fn admin(&self) -> String {
        let email = format!("admin-{}@example.com", Uuid::new_v4().simple());
        let (ok, stdout, stderr) = run(
            "api",
            &["create-admin", "--email", &email, "--name", "Admin"],
            &[("DATABASE_URL", self.db.url.clone())],
            Some(&format!("{PASSWORD}\n")),
        );
        assert!(ok, "create-admin failed: {stdout} {stderr}");
        self.token_for(&email).await
    }

    /// Creates an event as `admin_token` with the given overrides of a valid body.
    pub async fn create_event(&self, admin_token: &str, overrides: Value) -> Response {
        let mut body = json!({
            "name": "Turnstile Live",
            "location": "Main Hall",
            "organization": "Turnstile Concerts",
            "rating": "all-ages",
            "date": (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339(),
            "capacity": 100,
            "price": "49.90",
            "max_per_order": 4,
            "description": "An evening of queueing theory",
        });
        if let (Some(body), Some(overrides)) = (body.as_object_mut(), overrides.as_object()) {
            for (key, value) in overrides {
                body.insert(key.clone(), value.clone());
            }
        }
        self.post("/api/v1/events", &body, Some(admin_token)).await
    }
}

/// `GET url` with `token` until it answers 401 (at most a second: a revocation reaches
/// other api processes by notification); returns the last status.
pub async fn refused_within_a_second(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    let mut status = 0;
    for _ in 0..50 {
        status = client.get(url).bearer_auth(token).send().await.unwrap().status().as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status
}

/// A Standard Webhooks signature, computed here independently of the api's code:
/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign_webhook(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// An access token signed with the test api's key, as `api` itself would issue it.
pub fn mint_token(user: Uuid, role: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user, "role": role, "iss": "turnstile", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign token")
}

/// A response read whole: status, headers, raw body and the body as JSON (Null if not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub json: Value,
}

impl Response {
    pub async fn from(res: reqwest::Response) -> Self {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.expect("response body");
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        Response { status, headers, body, json }
    }

    /// Asserts the status and the error shape `{"error": {"code", "message"}}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.body);
        assert_eq!(self.json["error"]["code"], code, "unexpected error code; body: {}", self.body);
        assert!(
            self.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.body
        );
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A Prometheus text exposition, as scraped from a `/metrics` endpoint.
pub struct Exposition {
    pub text: String,
}

impl Exposition {
    /// `GET {base}/metrics`, which must answer 200 in the text format.
    pub async fn scrape(base: &str) -> Self {
        let response = reqwest::get(format!("{base}/metrics")).await.expect("metrics endpoint reachable");
        assert_eq!(response.status(), 200, "GET {base}/metrics");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("text/plain"), "content type {content_type}");
        Exposition { text: response.text().await.expect("metrics body") }
    }

    /// The sum of the samples named `name` whose labels include every `(label, value)` of
    /// `labels`; 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(sample_labels, _)| {
                labels.iter().all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
        self.text.lines().filter(|line| !line.starts_with('#')).filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((series_name, labels)) => (series_name, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            // Label values here never hold `,` or `"` (routes, statuses, outcomes).
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
    }

    /// `promtool check metrics` (Prometheus's own linter, from the distribution's
    /// `prometheus` package, which `scripts/services.sh start` installs) on this exposition.
    pub fn check_with_promtool(&self) {
        use std::io::Write;
        let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {promtool} (install the `prometheus` package, or run `make test`): {e}")
            });
        child.stdin.take().expect("stdin").write_all(self.text.as_bytes()).expect("exposition written to promtool");
        let out = child.wait_with_output().expect("promtool finished");
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
