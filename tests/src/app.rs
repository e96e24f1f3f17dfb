//! `TestApp`: a test's database, virtual host and api, and the workers it starts.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::in_process::config_from_env;
use crate::{
    InProcessApi, InProcessWorker, JWT_SECRET, Process, Services, TICKET_SECRET, TestBroker, TestDb, WEBHOOK_SECRET,
};

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

/// Settings for an api that refuses nothing at the door for lack of tickets (neither the
/// sold-out fast path nor queue full): every order is stored and the worker decides it,
/// which is what tests of the worker's decisions need.
pub fn worker_decides() -> Vec<(&'static str, String)> {
    vec![("SOLD_OUT_FAST_PATH", "false".to_owned()), ("QUEUE_DEMAND_FACTOR", "0".to_owned())]
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
}
