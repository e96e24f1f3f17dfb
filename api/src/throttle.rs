//! Login throttling: a limited number of attempts per account and minute, so that a password
//! cannot be guessed by brute force (GCRA from the `governor` crate).
//!
//! The key is the account's email (as the login normalises it), not the client address:
//! behind a proxy every client has the proxy's address, and a guess at one account from many
//! addresses is still a guess at one account. Spreading guesses over many accounts from one
//! address is for the proxy in front to limit.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The longest key kept (the longest valid email address).
const KEY_MAX_CHARS: usize = 320;

pub struct LoginThrottle {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl LoginThrottle {
    /// `attempts` at once per account, then one more every `60 s / attempts`.
    pub fn per_minute(attempts: NonZeroU32) -> Self {
        Self { limiter: RateLimiter::keyed(Quota::per_minute(attempts)), clock: DefaultClock::default() }
    }

    /// Counts an attempt at `account`; over the limit, how long to wait before the next.
    pub fn attempt(&self, account: &str) -> Result<(), Duration> {
        let key: String = account.trim().to_lowercase().chars().take(KEY_MAX_CHARS).collect();
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the accounts whose allowance is whole again, so that memory stays bounded.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_beyond_the_quota_wait_and_accounts_are_separate() {
        let throttle = LoginThrottle::per_minute(NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert!(throttle.attempt("ada@example.com").is_ok());
        }
        let wait = throttle.attempt(" ADA@example.com").expect_err("the fourth attempt waits");
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(throttle.attempt("grace@example.com").is_ok(), "another account is not affected");
    }
}
