//! Throttling of the expensive, guessable endpoints (GCRA from the `governor` crate):
//!
//! - log-in: attempts per account (the email as the log-in normalises it, `PATCH /me`
//!   password checks included), so that a password cannot be guessed by brute force even
//!   from many addresses; and attempts per client address, so that made-up emails do not
//!   each get a fresh allowance;
//! - sign-up: accounts created per client address, so that one client cannot flood the
//!   user table or keep the password hasher busy. Behind a reverse proxy every client has
//!   the proxy's address: raise `SIGNUP_PER_MINUTE` and limit at the proxy instead.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The longest key kept (the longest valid email address; an IP address is shorter).
const KEY_MAX_CHARS: usize = 320;

pub struct Throttle {
    /// Which limit this is: the `limit` label of `turnstile_rate_limited_total`.
    name: &'static str,
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Throttle {
    /// `attempts` at once per key, then one more every `60 s / attempts`.
    pub fn per_minute(name: &'static str, attempts: NonZeroU32) -> Self {
        Self { name, limiter: RateLimiter::keyed(Quota::per_minute(attempts)), clock: DefaultClock::default() }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Counts an attempt under `key` (compared trimmed and case-insensitively); over the
    /// limit, how long to wait before the next.
    pub fn attempt(&self, key: &str) -> Result<(), Duration> {
        let key: String = key.trim().to_lowercase().chars().take(KEY_MAX_CHARS).collect();
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the keys whose allowance is whole again, so that memory stays bounded.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Forgets idle keys every minute until `shutdown`.
    pub fn spawn_cleanup(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let throttle = self.clone();
        tokio::spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            while shutdown.run_until_cancelled(every_minute.tick()).await.is_some() {
                throttle.forget_idle();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_beyond_the_quota_wait_and_keys_are_separate() {
        let throttle = Throttle::per_minute("test", NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert!(throttle.attempt("ada@example.com").is_ok());
        }
        let wait = throttle.attempt(" ADA@example.com").expect_err("the fourth attempt waits");
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(throttle.attempt("grace@example.com").is_ok(), "another key is not affected");
    }
}
