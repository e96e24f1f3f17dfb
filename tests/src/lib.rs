//! Test harness for the end-to-end tests: every test gets its own PostgreSQL database and
//! its own `api` process (the real binary, on a random port), so tests run in parallel and
//! leave nothing behind.
//!
//! The services come from `scripts/services.sh start` (which `make test` runs); their URLs
//! are read from the environment or, failing that, from the env file that script writes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgPool};
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef012345";
pub const PASSWORD: &str = "correct horse battery";

/// The URLs of the local services.
#[derive(Clone, Debug)]
pub struct Services {
    pub database_url: String,
    pub amqp_url: String,
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
        Services { database_url: get("DATABASE_URL"), amqp_url: get("AMQP_URL") }
    }
}

fn workspace_root() -> PathBuf {
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

/// Path of a workspace binary next to the running test executable (target/<profile>/).
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
    pub async fn create(services: &Services) -> Self {
        let name = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&services.database_url).await.expect("connect to PostgreSQL");
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create test database");
        let (base, _) = services.database_url.rsplit_once('/').expect("DATABASE_URL has a database name");
        let url = format!("{base}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.expect("connect");
        TestDb { url, pool, name, admin_url: services.database_url.clone() }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        // Drop runs outside any runtime guarantee: do the clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async move {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await.ok()
            })
        })
        .join();
    }
}

/// A running process whose JSON log lines are forwarded to the test's output.
pub struct Process {
    child: Child,
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
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                if let (Some(wanted), Ok(value)) = (&wanted, serde_json::from_str::<Value>(&line))
                    && value["message"] == wanted.as_str()
                {
                    let _ = tx.send(value);
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{label} stderr] {line}");
            }
        });
        let mut process = Process { child };
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

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// The api, serving a database of its own.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub services: Services,
    api: Process,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// Starts the api with extra environment variables (e.g. a small body limit).
    pub async fn spawn_with(extra_env: &[(&str, String)]) -> Self {
        let services = Services::from_env();
        let db = TestDb::create(&services).await;
        let mut envs = vec![
            ("DATABASE_URL", db.url.clone()),
            ("AMQP_URL", services.amqp_url.clone()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ("BIND_ADDR", "127.0.0.1:0".to_owned()),
            ("DATABASE_MAX_CONNECTIONS", "10".to_owned()),
        ];
        envs.extend(extra_env.iter().cloned());
        let (api, ready) = Process::spawn("api", &["serve"], &envs, Some("listening"));
        let addr = ready.and_then(|v| v["addr"].as_str().map(str::to_owned)).expect("listening line has addr");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client");
        TestApp { base: format!("http://{addr}"), client, db, services, api }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the api process (e.g. to check what survives it).
    pub fn stop_api(&mut self) {
        self.api.kill();
    }

    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut request = self.client.post(self.url(path)).json(body);
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
