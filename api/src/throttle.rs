//! Throttling of the expensive, guessable endpoints, shared by every api process (the
//! limits live in PostgreSQL, `rate_limits`, so N copies of the api behind a load balancer
//! allow what one allows):
//!
//! - log-in: attempts per account (the email as the log-in normalises it, `PATCH /me`
//!   password checks included), so that a password cannot be guessed by brute force even
//!   from many addresses; and attempts per client address, so that made-up emails do not
//!   each get a fresh allowance;
//! - sign-up: accounts created per client address, so that one client cannot flood the
//!   user table or keep the password hasher busy. Behind a reverse proxy every client has
//!   the proxy's address: raise `SIGNUP_PER_MINUTE` and limit at the proxy instead.
//!
//! The rule is GCRA (the generic cell rate algorithm, as in the `governor` crate): `n`
//! attempts at once per key, then one more every `60 s / n`. Each key keeps one timestamp,
//! the theoretical arrival time (`tat`) of its next attempt; an attempt is allowed when
//! `max(tat, now) + 60 s / n` is at most a minute ahead, and then moves `tat` there. One
//! statement checks and counts, under the row's lock, so concurrent attempts on several api
//! processes are counted exactly.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

/// The longest key kept (the longest valid email address; an IP address is shorter).
const KEY_MAX_CHARS: usize = 320;
/// The window the allowance fills over.
const WINDOW: Duration = Duration::from_secs(60);

pub struct Throttle {
    /// Which limit this is: the `limit` label of `turnstile_rate_limited_total`, and the
    /// `name` of its rows.
    name: &'static str,
    /// `60 s / attempts`: the time one attempt takes from the allowance.
    interval: Duration,
}

/// Why an attempt was not counted.
#[derive(Debug)]
pub enum Refused {
    /// Over the limit: wait this long before the next attempt.
    Wait(Duration),
    /// The database could not be asked.
    Database(sqlx::Error),
}

impl Throttle {
    /// `attempts` at once per key, then one more every `60 s / attempts`.
    pub fn per_minute(name: &'static str, attempts: NonZeroU32) -> Self {
        Self { name, interval: WINDOW / attempts.get() }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Counts an attempt under `key` (compared trimmed and case-insensitively); over the
    /// limit, how long to wait before the next.
    pub async fn attempt(&self, db: &PgPool, key: &str) -> Result<(), Refused> {
        // PostgreSQL text cannot hold NUL: such a key (no valid email has one) counts as
        // the key without it.
        let key: String = key.trim().to_lowercase().chars().filter(|c| *c != '\0').take(KEY_MAX_CHARS).collect();
        // One statement: count the attempt if the allowance has room (a `NULL` wait), or
        // else read how long until it has (the row as it was: the refused update left it).
        // No row at all: refused, by a row this statement's snapshot does not show yet (the
        // key's first attempts arrived together); then the wait is one interval.
        let wait_secs: Option<Option<f64>> = sqlx::query_scalar!(
            "WITH attempt AS (
                 INSERT INTO rate_limits AS r (name, key, tat)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (name, key) DO UPDATE
                 SET tat = greatest(r.tat, clock_timestamp()) + make_interval(secs => $3)
                 WHERE greatest(r.tat, clock_timestamp()) + make_interval(secs => $3)
                       <= clock_timestamp() + make_interval(secs => $4)
                 RETURNING NULL::float8 AS wait
             )
             SELECT wait FROM attempt
             UNION ALL
             SELECT extract(epoch FROM tat + make_interval(secs => $3) - make_interval(secs => $4)
                                       - clock_timestamp())::float8
             FROM rate_limits WHERE name = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM attempt)",
            self.name,
            &key,
            self.interval.as_secs_f64(),
            WINDOW.as_secs_f64()
        )
        .fetch_optional(db)
        .await
        .map_err(Refused::Database)?;
        match wait_secs {
            Some(None) => Ok(()),
            Some(Some(wait)) => Err(Refused::Wait(Duration::from_secs_f64(wait.clamp(0.0, WINDOW.as_secs_f64())))),
            None => Err(Refused::Wait(self.interval)),
        }
    }

    /// Forgets the keys whose allowance is whole again, so that the table stays small.
    pub async fn forget_idle(&self, db: &PgPool) -> sqlx::Result<u64> {
        let forgotten = sqlx::query!("DELETE FROM rate_limits WHERE name = $1 AND tat < clock_timestamp()", self.name)
            .execute(db)
            .await?;
        Ok(forgotten.rows_affected())
    }

    /// Forgets idle keys every minute until `shutdown` (every api process does it; a row
    /// deleted twice is deleted once).
    pub async fn clean_up(self: Arc<Self>, db: PgPool, shutdown: tokio_util::sync::CancellationToken) {
        let mut every_minute = tokio::time::interval(WINDOW);
        while shutdown.run_until_cancelled(every_minute.tick()).await.is_some() {
            if let Err(err) = self.forget_idle(&db).await {
                tracing::warn!(limit = self.name, error = %err, "forgetting idle rate limits failed");
            }
        }
    }
}
