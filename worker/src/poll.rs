//! The worker's polling loops (re-publisher, expiry, events relay, webhook deliverer,
//! heartbeat) share one loop and one error policy: a [`Round`] of work at start and then
//! every interval, at once again while rounds come back full; a failed round is logged and retried with
//! back-off ([`Backoff`]: 100 ms doubling to 5 s); a failure that no retry can fix (the
//! database refuses the credentials or is gone, [`common::db::is_permanent`]) ends the loop
//! with that error, which stops the process (see [`common::supervise`]).

use std::future::Future;
use std::time::Duration;

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

/// Runs `work` every `interval` until shutdown (see the module's documentation); `name`
/// labels its log lines.
pub async fn every(
    name: &'static str,
    interval: Duration,
    shutdown: &CancellationToken,
    work: &mut impl Round,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::default();
    // The first round at once (a heartbeat, work left by a predecessor).
    let mut pause = Duration::ZERO;
    loop {
        if shutdown.run_until_cancelled(tokio::time::sleep(pause)).await.is_none() {
            return Ok(());
        }
        pause = match work.round().await {
            Ok(Next::Again) if !shutdown.is_cancelled() => {
                backoff.reset();
                Duration::ZERO
            }
            Ok(_) => {
                backoff.reset();
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
        every("test", Duration::from_secs(10), &shutdown, &mut work).await.expect("stopped by shutdown");
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
        every("test", Duration::from_secs(1), &shutdown, &mut work).await.expect("retried, then stopped by shutdown");
        assert_eq!(work.failures, 4);
        assert!(rounds.load(Ordering::SeqCst) > 4, "went on after the failures");
    }
}
