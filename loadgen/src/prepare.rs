//! Rows the scenarios need, written straight to PostgreSQL, and the counts read back.

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

/// `n` events of `capacity` tickets each, on sale for a month.
pub async fn events(db: &PgPool, n: u32, capacity: u32) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(10_000) {
        sqlx::query(
            "INSERT INTO events (id, name, location, organization, starts_at, capacity, price, max_per_order)
             SELECT id, 'Load test', 'Bench', 'loadgen', now() + interval '30 days', $2, 10, 10
             FROM UNNEST($1::uuid[]) AS e(id)",
        )
        .bind(chunk)
        .bind(i32::try_from(capacity)?)
        .execute(db)
        .await?;
    }
    Ok(ids)
}

/// `n` users straight into the database (no password hash: argon2 is not measured).
pub async fn users(db: &PgPool, n: u64) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(10_000) {
        let emails: Vec<String> = chunk.iter().map(|id| format!("load-{}@example.com", id.simple())).collect();
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash)
             SELECT id, email, 'Load', 'not-a-password-hash' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
        )
        .bind(chunk)
        .bind(&emails)
        .execute(db)
        .await?;
    }
    Ok(ids)
}

/// Bearer tokens for `users`, signed as the api signs them.
pub fn tokens(users: &[Uuid], jwt_secret: &str) -> anyhow::Result<Vec<String>> {
    let key = jsonwebtoken::EncodingKey::from_secret(jwt_secret.as_bytes());
    let now = Utc::now().timestamp();
    users
        .iter()
        .map(|id| {
            let claims =
                serde_json::json!({"sub": id, "role": "user", "iss": "turnstile", "iat": now, "exp": now + 7200});
            Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
        })
        .collect()
}

/// Orders of these events still `QUEUED`.
pub async fn queued(db: &PgPool, events: &[Uuid]) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE event_id = ANY($1) AND status = 'QUEUED'")
        .bind(events)
        .fetch_one(db)
        .await
}

/// Waits until no order of these events is `QUEUED`; returns how many are left at the timeout.
pub async fn wait_until_decided(db: &PgPool, events: &[Uuid], timeout: Duration) -> sqlx::Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = queued(db, events).await?;
        if left == 0 || Instant::now() >= deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live tickets of these events, and by how many tickets events exceed their capacity
/// (0 unless something is badly wrong).
pub async fn sold_and_oversold(db: &PgPool, events: &[Uuid]) -> sqlx::Result<(i64, i64)> {
    let (sold, oversold): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT sum(live)::int8, sum(greatest(live - capacity, 0))::int8 FROM (
             SELECT e.capacity, count(t.id) AS live
             FROM events e LEFT JOIN tickets t ON t.event_id = e.id AND t.status = 'ACTIVE'
             WHERE e.id = ANY($1) GROUP BY e.id) per_event",
    )
    .bind(events)
    .fetch_one(db)
    .await?;
    Ok((sold.unwrap_or(0), oversold.unwrap_or(0)))
}

/// Resident and peak resident memory of a process, in MiB, from `/proc/{pid}/status`.
pub fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
