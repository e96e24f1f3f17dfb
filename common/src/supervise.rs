//! A process's long-running tasks under supervision. Every task has a name. One that ends
//! before shutdown (returns, fails, or panics) is a fault: it is logged by name, the
//! process's readiness turns red ([`Failed`]), shutdown begins so that the other tasks
//! finish their work in hand, and [`Tasks::supervise`] returns the error, so the process
//! exits non-zero and its orchestrator restarts it. A task that panics during shutdown is a
//! fault too; one that returns then is simply done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// The name of the first supervised task that ended on its own, once one has: readiness
/// probes answer `503` from then on.
#[derive(Clone, Debug, Default)]
pub struct Failed(Arc<OnceLock<String>>);

impl Failed {
    /// The task that ended, if one has.
    pub fn task(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// The supervised tasks of one process, and its shutdown token.
pub struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, String>,
    shutdown: CancellationToken,
    failed: Failed,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { set: JoinSet::new(), names: HashMap::new(), shutdown, failed: Failed::default() }
    }

    /// The shared flag that readiness probes read.
    pub fn failed(&self) -> Failed {
        self.failed.clone()
    }

    /// Runs `task` under `name`. It should run until shutdown; returning `Err` says why it
    /// could not go on.
    pub fn spawn<F, T>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = T> + Send + 'static,
        T: Into<TaskEnd>,
    {
        let handle = self.set.spawn(async move { task.await.into().0 });
        self.names.insert(handle.id(), name.into());
    }

    /// Waits until every task has ended. Before shutdown that means the first one to end is
    /// a fault (see the module's documentation): `Err` names it and says why.
    pub async fn supervise(mut self) -> anyhow::Result<()> {
        let mut fault: Option<anyhow::Error> = None;
        while let Some(joined) = self.set.join_next_with_id().await {
            let (id, result) = match joined {
                Ok((id, result)) => (id, result),
                Err(err) => (err.id(), Err(panic_error(err))),
            };
            let name = self.names.remove(&id).unwrap_or_else(|| "unnamed".to_owned());
            let error = match result {
                Ok(()) if self.shutdown.is_cancelled() => continue,
                Ok(()) => anyhow::anyhow!("the {name} task ended"),
                Err(err) => err.context(format!("the {name} task failed")),
            };
            tracing::error!(task = %name, error = format!("{error:#}"), "a task stopped; stopping the process");
            let _ = self.failed.0.set(name);
            self.shutdown.cancel();
            fault.get_or_insert(error);
        }
        fault.map_or(Ok(()), Err)
    }
}

fn panic_error(err: JoinError) -> anyhow::Error {
    match err.try_into_panic() {
        Ok(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            anyhow::anyhow!("panicked: {message}")
        }
        Err(err) => anyhow::anyhow!("cancelled: {err}"),
    }
}

/// What a supervised task returns: nothing, or why it could not go on.
pub struct TaskEnd(anyhow::Result<()>);

impl From<()> for TaskEnd {
    fn from((): ()) -> Self {
        Self(Ok(()))
    }
}

impl From<anyhow::Result<()>> for TaskEnd {
    fn from(result: anyhow::Result<()>) -> Self {
        Self(result)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn until(shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }

    #[tokio::test]
    async fn tasks_that_end_at_shutdown_are_done() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("a", until(shutdown.clone()));
        tasks.spawn("b", until(shutdown.clone()));
        let failed = tasks.failed();
        shutdown.cancel();
        tasks.supervise().await.expect("a clean stop");
        assert_eq!(failed.task(), None);
    }

    #[tokio::test]
    async fn a_task_that_returns_early_stops_the_others_and_is_named() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("steady", until(shutdown.clone()));
        tasks.spawn("quitter", async { tokio::time::sleep(Duration::from_millis(10)).await });
        let failed = tasks.failed();
        let err = tasks.supervise().await.expect_err("a fault");
        assert_eq!(err.to_string(), "the quitter task ended");
        assert_eq!(failed.task(), Some("quitter"));
        assert!(shutdown.is_cancelled(), "the others were asked to stop");
    }

    #[tokio::test]
    async fn a_failing_or_panicking_task_is_a_fault_with_its_reason() {
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("steady", until(shutdown.clone()));
        tasks.spawn("failing", async { anyhow::Result::<()>::Err(anyhow::anyhow!("the database is gone")) });
        let err = tasks.supervise().await.expect_err("a fault");
        assert_eq!(format!("{err:#}"), "the failing task failed: the database is gone");

        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        tasks.spawn("steady", until(shutdown.clone()));
        tasks.spawn("panicking", async {
            let items: Vec<u8> = Vec::new();
            // An out-of-bounds index: a bug, as a panic would be in production.
            let _ = items[usize::from(items.is_empty())];
        });
        let failed = tasks.failed();
        let err = tasks.supervise().await.expect_err("a fault");
        assert!(format!("{err:#}").starts_with("the panicking task failed: panicked: index out of bounds"), "{err:#}");
        assert_eq!(failed.task(), Some("panicking"));
    }
}
