//! The worker's polling loops (re-publisher, expiry, events relay, webhook deliverer,
//! heartbeat) share one loop and one error policy: a [`Round`] of work at start and then
//! every interval, at once again while rounds come back full; a failed round is logged and retried with
//! back-off ([`Backoff`]: 100 ms doubling to 5 s); a failure that no retry can fix (the
//! database refuses the credentials or is gone, [`common::db::is_permanent`]) ends the loop
//! with that error, which stops the process (see [`common::supervise`]).

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;

/// What a round asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Done for now: wait for the next interval.
    Wait,
    /// The round was full and more may be waiting: go again at once.
    Again,
}

/// One kind of polling work.
pub trait Round: Send {
    /// Does one round of work.
    fn round(&mut self) -> impl Future<Output = anyhow::Result<Next>> + Send;

    /// Called after a failed round, before the retry (e.g. to drop a broken channel).
    fn failed(&mut self) {}
}

/// Asks a polling loop for a round now, and hears when it is done: the handle a test holds
/// instead of sleeping past an interval (see [`crate::Steps`]).
#[derive(Clone)]
pub struct Stepper(mpsc::Sender<oneshot::Sender<()>>);

/// The loop's end of a [`Stepper`]; [`Steps::none`] for a loop nobody steps.
pub struct Steps(Option<mpsc::Receiver<oneshot::Sender<()>>>);

impl Steps {
    /// A loop that runs on its interval only.
    pub fn none() -> Self {
        Self(None)
    }

    /// A loop that a [`Stepper`] can also wake.
    pub fn new() -> (Stepper, Self) {
        let (requests, steps) = mpsc::channel(16);
        (Stepper(requests), Self(Some(steps)))
    }

    /// The next request for a round, or never.
    async fn requested(&mut self) -> Option<oneshot::Sender<()>> {
        match &mut self.0 {
            Some(steps) => steps.recv().await,
            None => std::future::pending().await,
        }
    }
}

impl Stepper {
    /// Runs a round of the loop now (it does not wait for its interval), and returns once a
    /// round begun after this call has found nothing more to do (rounds that come back full
    /// go again first; a failed one is retried as usual). `false`: the loop has stopped.
    pub async fn step(&self) -> bool {
        let (done, answer) = oneshot::channel();
        self.0.send(done).await.is_ok() && answer.await.is_ok()
    }
}

/// Runs `work` every `interval` until shutdown (see the module's documentation), and at once
/// when `steps` asks; `name` labels its log lines.
pub async fn every(
    name: &'static str,
    interval: Duration,
    shutdown: &CancellationToken,
    work: &mut impl Round,
    mut steps: Steps,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::default();
    // Step requests waiting for a round that ends with nothing more to do.
    let mut stepping: Vec<oneshot::Sender<()>> = Vec::new();
    // The first round at once (a heartbeat, work left by a predecessor).
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            Some(step) = steps.requested() => stepping.push(step),
            () = tokio::time::sleep(pause) => {}
        }
        pause = match work.round().await {
            Ok(Next::Again) if !shutdown.is_cancelled() => {
                backoff.reset();
                Duration::ZERO
            }
            Ok(_) => {
                backoff.reset();
                for step in stepping.drain(..) {
                    let _ = step.send(());
                }
                interval
            }
            Err(err) if common::db::is_permanent_anyhow(&err) => return Err(err),
            Err(err) => {
                tracing::warn!(task = name, error = format!("{err:#}"), "round failed; retrying");
                work.failed();
                backoff.next_delay()
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers the scripted results in turn, then waits.
    struct Scripted {
        results: Vec<anyhow::Result<Next>>,
        rounds: Arc<AtomicUsize>,
        failures: usize,
    }

    impl Round for Scripted {
        async fn round(&mut self) -> anyhow::Result<Next> {
            self.rounds.fetch_add(1, Ordering::SeqCst);
            if self.results.is_empty() { Ok(Next::Wait) } else { self.results.remove(0) }
        }

        fn failed(&mut self) {
            self.failures += 1;
        }
    }

    fn scripted(results: Vec<anyhow::Result<Next>>) -> (Scripted, Arc<AtomicUsize>) {
        let rounds = Arc::new(AtomicUsize::new(0));
        (Scripted { results, rounds: rounds.clone(), failures: 0 }, rounds)
    }

    #[tokio::test(start_paused = true)]
    async fn full_rounds_go_again_at_once_and_failures_back_off() {
        let shutdown = CancellationToken::new();
        let (mut work, rounds) = scripted(vec![
            Ok(Next::Again),
            Ok(Next::Again),
            Ok(Next::Wait),
            Err(anyhow::anyhow!("the broker is away")),
            Ok(Next::Wait),
        ]);
        let started = tokio::time::Instant::now();
        let stop = shutdown.clone();
        let watcher = tokio::spawn(async move {
            // Rounds at 0 s, 0 s, 0 s (full, full, done), then 10 s (failed), 10.1 s.
            tokio::time::sleep(Duration::from_secs(15)).await;
            stop.cancel();
        });
        every("test", Duration::from_secs(10), &shutdown, &mut work, Steps::none()).await.expect("stopped by shutdown");
        watcher.await.expect("watcher");
        assert_eq!(rounds.load(Ordering::SeqCst), 5);
        assert_eq!(work.failures, 1);
        assert!(started.elapsed() < Duration::from_secs(16));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_database_is_retried_until_shutdown() {
        // (A permanent refusal, which ends the loop, is a database error with its SQLSTATE,
        // which only PostgreSQL makes: `tests/tests/e2e/operations.rs` drops a worker's database.)
        let shutdown = CancellationToken::new();
        let (mut work, rounds) =
            scripted((0..4).map(|_| Err(anyhow::Error::new(sqlx::Error::PoolTimedOut).context("a round"))).collect());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.cancel();
        });
        every("test", Duration::from_secs(1), &shutdown, &mut work, Steps::none())
            .await
            .expect("retried, then stopped by shutdown");
        assert_eq!(work.failures, 4);
        assert!(rounds.load(Ordering::SeqCst) > 4, "went on after the failures");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_runs_rounds_now_until_one_finds_nothing_more() {
        let shutdown = CancellationToken::new();
        let (mut work, rounds) = scripted(vec![Ok(Next::Wait), Ok(Next::Again), Ok(Next::Wait)]);
        let (stepper, steps) = Steps::new();
        let stop = shutdown.clone();
        let started = tokio::time::Instant::now();
        let test = tokio::spawn(async move {
            // Let the first round (at start) run, then step long before the hour is up.
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(rounds.load(Ordering::SeqCst), 1);
            assert!(stepper.step().await, "the loop answers");
            // The step's rounds: one came back full, so it went again.
            assert_eq!(rounds.load(Ordering::SeqCst), 3);
            assert!(started.elapsed() < Duration::from_secs(2), "stepped, not waited out");
            stop.cancel();
            stepper
        });
        every("test", Duration::from_secs(3600), &shutdown, &mut work, steps).await.expect("stopped by shutdown");
        let stepper = test.await.expect("the test task");
        assert!(!stepper.step().await, "a stopped loop says so");
    }
}
