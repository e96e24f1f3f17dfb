//! Which access tokens no longer count. A token carries the account's `token_version` of the
//! moment it was issued (`ver`); changing the account's role or password, or deactivating it,
//! raises the version (a database trigger), and tokens with an older one are refused with 401.
//! Deleting the account announces [`GONE`], a version no token carries (migration 0015).
//!
//! Checking the database on every request would put a read on the purchase path. Instead
//! the api keeps in memory the accounts whose version rose within the longest token
//! lifetime (7 days; older tokens have expired anyway): few, since it takes a password or
//! role change to get in. The list is loaded when the `token_revocations` listener
//! connects and kept current by its notifications, which reach every api process within
//! milliseconds of the commit; the process that made the change records it at once. While
//! the listener is disconnected (notifications may be missed), every check asks the
//! database instead.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;

/// The `NOTIFY` channel of `<user id>:<version>` announcements (migration 0006).
pub const CHANNEL: &str = "token_revocations";

/// The refusal of a revoked token.
pub const REVOKED: ApiError = ApiError::Unauthorized(
    "this access token was revoked by a change of password or role, or its account was deactivated or deleted; \
     log in again",
);

/// The version announced for a deleted account: above any token's, so all of them are refused.
pub const GONE: i32 = i32::MAX;

#[derive(Default)]
pub struct Revocations {
    /// Current `token_version` of the accounts whose version rose within 7 days.
    versions: RwLock<HashMap<Uuid, i32>>,
    /// Whether `versions` is complete: loaded, with the listener connected since.
    synced: AtomicBool,
}

impl Revocations {
    /// `Ok` when a token of `user` carrying `version` is still good.
    pub async fn check(&self, db: &PgPool, user: Uuid, version: i32) -> Result<(), ApiError> {
        let current = if self.synced.load(Ordering::Acquire) {
            self.versions.read().unwrap_or_else(|e| e.into_inner()).get(&user).copied()
        } else {
            // No row: the account was deleted.
            let row =
                sqlx::query_scalar!("SELECT token_version FROM users WHERE id = $1", user).fetch_optional(db).await?;
            Some(row.unwrap_or(GONE))
        };
        match current {
            Some(current) if version < current => Err(REVOKED),
            _ => Ok(()),
        }
    }

    /// The account's tokens below `version` are revoked (a change this process made, or a
    /// notification).
    pub fn record(&self, user: Uuid, version: i32) {
        let mut versions = self.versions.write().unwrap_or_else(|e| e.into_inner());
        let current = versions.entry(user).or_insert(version);
        *current = (*current).max(version);
    }

    /// Applies a notification's payload, `<user id>:<version>`.
    pub fn record_announced(&self, payload: &str) {
        let parsed =
            payload.split_once(':').and_then(|(user, version)| Some((user.parse().ok()?, version.parse().ok()?)));
        match parsed {
            Some((user, version)) => self.record(user, version),
            None => tracing::warn!(payload, "unreadable token revocation notification"),
        }
    }

    /// Loads the whole list; to be called once the listener is connected, so that nothing
    /// announced after this read is missed.
    pub async fn reload(&self, db: &PgPool) -> Result<(), sqlx::Error> {
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", token_version AS "token_version!" FROM users
                WHERE token_version_at > now() - interval '7 days'
               UNION ALL
               SELECT id, $1::int FROM deleted_users WHERE deleted_at > now() - interval '7 days'"#,
            GONE
        )
        .fetch_all(db)
        .await?;
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) =
            rows.into_iter().map(|row| (row.id, row.token_version)).collect();
        self.synced.store(true, Ordering::Release);
        Ok(())
    }

    /// The listener lost its connection: until it reloads, ask the database.
    pub fn lost(&self) {
        self.synced.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_rise() {
        let revocations = Revocations::default();
        let user = Uuid::from_u128(1);
        revocations.record_announced(&format!("{user}:3"));
        revocations.record(user, 2);
        revocations.record_announced("garbage");
        assert_eq!(revocations.versions.read().unwrap().get(&user), Some(&3));
    }
}
