//! The PostgreSQL pool and the embedded migrations.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseConfig;

/// The SQL files in `migrations/`, compiled into every binary that applies them.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long start-up keeps retrying a database that is not reachable yet (e.g. a container
/// that is still booting) before giving up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Connects the pool, retrying for a while so that a process started together with its
/// database does not fail on the first attempt. Returns once `DATABASE_MIN_CONNECTIONS` are
/// open (sqlx keeps that many open from then on).
///
/// Every connection the pool hands out is on a primary: a new one is refused if its server
/// is a standby, and an idle one is checked before it is lent (instead of sqlx's ping, in
/// the same round trip) and dropped if its server was demoted or went away since. After a
/// failover behind a proxy (HAProxy routing to the Patroni leader) the pool thus reconnects
/// to the new primary rather than lending connections left on the old one, whose writes
/// would fail with `25006 read_only_sql_transaction`.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(config.min_connections.min(config.max_connections))
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(async move { on_a_primary(conn).await }))
        .before_acquire(|conn, _| Box::pin(async move { Ok(on_a_primary(conn).await.is_ok()) }));
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    loop {
        match options.clone().connect(config.url.expose()).await {
            Ok(pool) => return Ok(pool),
            Err(err) if tokio::time::Instant::now() < deadline && is_transient(&err) => {
                tracing::warn!(error = %err, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// `Ok` if the connection's server is a primary (it can write); an error that
/// [`is_unavailable`] counts as the database being unreachable if it is a standby.
async fn on_a_primary(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let standby = sqlx::query_scalar!(r#"SELECT pg_is_in_recovery() AS "standby!""#).fetch_one(conn).await?;
    if standby {
        return Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connected to a standby (read-only) server, not the primary",
        )));
    }
    Ok(())
}

fn is_transient(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
}

/// Applies pending migrations. Safe to run from several processes at once: sqlx holds an
/// advisory lock while migrating.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether the database answers `SELECT 1` within `limit` (the readiness probes of api and
/// worker).
pub async fn answers(pool: &PgPool, limit: Duration) -> bool {
    let check = sqlx::query_scalar!(r#"SELECT 1 AS "one!""#).fetch_one(pool);
    matches!(tokio::time::timeout(limit, check).await, Ok(Ok(1)))
}

/// Whether the error is a refusal that no retry can fix: PostgreSQL refuses this process's
/// credentials (SQLSTATE class 28: a rotated password, a dropped role) or its database no
/// longer exists (`3D000`). A background loop stops on these, so that the process exits and
/// is restarted (with its current configuration) instead of retrying for ever.
pub fn is_permanent(err: &sqlx::Error) -> bool {
    err.as_database_error().and_then(|db| db.code()).is_some_and(|code| code.starts_with("28") || code == "3D000")
}

/// [`is_permanent`] for an error that may wrap a database error.
pub fn is_permanent_anyhow(err: &anyhow::Error) -> bool {
    err.chain().filter_map(|cause| cause.downcast_ref::<sqlx::Error>()).any(is_permanent)
}

/// Whether the error means the database is unreachable or overloaded (as opposed to a bug
/// or a constraint): callers answer 503 for these.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (class 08), operator intervention (class 57: the server
        // shutting down or starting up, e.g. `57P01 admin_shutdown`, `57P03 cannot_connect_now`)
        // and `25006 read_only_sql_transaction` (a primary demoted under the connection, in a
        // failover).
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P") || code == "25006")
        }
        _ => false,
    }
}

/// The PostgreSQL `NOTIFY` channel on which order ids are announced after their status
/// changed; the api's long-poll (`GET /orders/{id}?wait=N`) listens to it.
pub const ORDER_CHANGES_CHANNEL: &str = "order_changes";

/// Announces, on commit of the surrounding transaction, that these orders changed. The ids
/// travel comma-separated in as few notifications as the 8000-byte payload limit allows, all
/// sent by one statement.
pub async fn notify_order_changes(conn: &mut sqlx::PgConnection, ids: &[uuid::Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    // 36 characters and a comma per id.
    let payloads: Vec<String> =
        ids.chunks(200).map(|chunk| chunk.iter().map(uuid::Uuid::to_string).collect::<Vec<_>>().join(",")).collect();
    sqlx::query!("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p", ORDER_CHANGES_CHANNEL, &payloads)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
