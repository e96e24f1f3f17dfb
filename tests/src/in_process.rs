//! The api and the worker built in the test's own process, from the settings their binaries
//! would read.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A service running on the test's runtime until stopped or dropped, as on SIGTERM.
struct Running {
    what: &'static str,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn spawn(
        what: &'static str,
        shutdown: CancellationToken,
        run: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Self {
        Self { what, shutdown, task: Some(tokio::spawn(run)) }
    }

    /// Cancels its shutdown token and waits for its tasks; their result.
    async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.shutdown.cancel();
        let task = self.task.take()?;
        Some(task.await.unwrap_or_else(|err| Err(anyhow::anyhow!("the {} panicked: {err}", self.what))))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An api built in the test's process, stopped when dropped.
pub struct InProcessApi(Running);

impl InProcessApi {
    /// Builds the api from `env` (the variables its binary would read) and starts it on
    /// the test's runtime; returns it with its base URL.
    pub(crate) async fn start(env: &[(String, String)]) -> (Self, String) {
        let shutdown = CancellationToken::new();
        let application =
            api::Application::build(api_config(env), shutdown.clone()).await.expect("building the api in-process");
        let base = format!("http://{}", application.addr());
        (InProcessApi(Running::spawn("api", shutdown, application.run_until_stopped())), base)
    }

    /// Stops it as SIGTERM would, and waits for its tasks; their result.
    pub async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.0.stop().await
    }
}

/// The `ApiConfig` the api binary would read from `env` (see [`config_from_env`]).
pub(crate) fn api_config(env: &[(String, String)]) -> common::config::ApiConfig {
    config_from_env("api", env)
}

/// The configuration a binary would read from `env`: each variable becomes the flag that
/// reads it (so that the test's own environment cannot override it).
pub(crate) fn config_from_env<C: clap::Args>(binary: &str, env: &[(String, String)]) -> C {
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
    running: Running,
    steps: worker::Steps,
}

impl InProcessWorker {
    /// Builds the worker, starts it on the test's runtime and waits until it is subscribed
    /// to every partition.
    pub(crate) async fn start(config: common::config::WorkerConfig) -> Self {
        let shutdown = CancellationToken::new();
        let built = worker::Worker::build(config, shutdown.clone()).await.expect("building the worker in-process");
        let (steps, mut ready) = (built.steps(), built.ready());
        let running = Running::spawn("worker", shutdown, built.run_until_stopped());
        let subscribed = tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|ready| *ready)).await;
        assert!(subscribed.is_ok_and(|r| r.is_ok()), "the worker did not subscribe to its partitions within 60 s");
        InProcessWorker { running, steps }
    }

    /// Runs rounds of its polling loops now: `worker.steps().expiry().await` returns once
    /// the holds due are expired.
    pub fn steps(&self) -> &worker::Steps {
        &self.steps
    }

    /// Stops it as SIGTERM would, and waits for its tasks; their result.
    pub async fn stop(&mut self) -> Option<anyhow::Result<()>> {
        self.running.stop().await
    }
}
