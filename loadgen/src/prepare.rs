//! Rows the scenarios need, written straight to PostgreSQL, and the counts read back.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

/// `n` events of `capacity` tickets each, on sale for a month.
pub async fn events(db: &PgPool, n: u32, capacity: u32) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(10_000) {
        sqlx::query!(
            "INSERT INTO events (id, name, location, organization, starts_at, capacity, price, max_per_order)
             SELECT id, 'Load test', 'Bench', 'loadgen', now() + interval '30 days', $2, 10, 10
             FROM UNNEST($1::uuid[]) AS e(id)",
            chunk,
            i32::try_from(capacity)?
        )
        .execute(db)
        .await?;
    }
    Ok(ids)
}

/// The `tiers` scenario's ticket types of each event: its default type (General admission,
/// no stock of its own), VIP (a tenth of the capacity) and Student (a fifth), in that order.
pub async fn tiers(db: &PgPool, events: &[Uuid], capacity: u32) -> anyhow::Result<Vec<[Uuid; 3]>> {
    let capacity = i32::try_from(capacity)?;
    let mut types = Vec::with_capacity(events.len());
    for chunk in events.chunks(10_000) {
        let (vip, student): (Vec<Uuid>, Vec<Uuid>) = chunk.iter().map(|_| (Uuid::now_v7(), Uuid::now_v7())).unzip();
        sqlx::query!(
            "INSERT INTO ticket_types (id, event_id, name, price, capacity, sort_order)
             SELECT v, e, 'VIP', 99, greatest($4 / 10, 1), 1 FROM UNNEST($1::uuid[], $2::uuid[]) AS t(e, v)
             UNION ALL
             SELECT s, e, 'Student', 5, greatest($4 / 5, 1), 2 FROM UNNEST($1::uuid[], $3::uuid[]) AS t(e, s)",
            chunk,
            &vip,
            &student,
            capacity
        )
        .execute(db)
        .await?;
        let defaults: std::collections::HashMap<Uuid, Uuid> =
            sqlx::query!(r#"SELECT id, default_ticket_type_id AS "general!" FROM events WHERE id = ANY($1)"#, chunk)
                .fetch_all(db)
                .await?
                .into_iter()
                .map(|row| (row.id, row.general))
                .collect();
        for (i, event) in chunk.iter().enumerate() {
            let general = *defaults.get(event).ok_or_else(|| anyhow::anyhow!("event {event} has no default type"))?;
            types.push([general, vip[i], student[i]]);
        }
    }
    Ok(types)
}

/// The code every order carries with `--promo-code`, one per event.
pub const PROMO_CODE: &str = "BENCH10";

/// A promo code for each event: 10% off every type, at most `capacity` uses, 10 per buyer.
/// `prequeue`: the events' pre-sale queue open (since a second ago) and their sale a day
/// away, with a seed, so the orders sent are pre-sale entries; [`open_sale`] opens it.
pub async fn presale(db: &PgPool, events: &[Uuid]) -> anyhow::Result<()> {
    sqlx::query!(
        "UPDATE events SET prequeue_opens_at = now() - interval '1 second', sales_start = now() + interval '1 day',
                           draw_seed = sha256(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
         WHERE id = ANY($1)",
        events
    )
    .execute(db)
    .await?;
    sqlx::query!("UPDATE event_queues SET draw_pending = true WHERE event_id = ANY($1)", events).execute(db).await?;
    Ok(())
}

/// `prequeue`: the sale opens now (the worker's draw loop draws within its interval);
/// returns the opening.
pub async fn open_sale(db: &PgPool, events: &[Uuid]) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar!(
        r#"UPDATE events SET sales_start = clock_timestamp() WHERE id = ANY($1) RETURNING sales_start AS "at!""#,
        events
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .max()
    .context("no event to open")
}

pub async fn promo_codes(db: &PgPool, events: &[Uuid], capacity: u32) -> anyhow::Result<()> {
    for chunk in events.chunks(10_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        sqlx::query!(
            "INSERT INTO promo_codes (id, event_id, code, percent_off, max_uses, max_uses_per_buyer)
             SELECT id, e, $3, 10, $4, 10 FROM UNNEST($1::uuid[], $2::uuid[]) AS c(id, e)",
            &ids,
            chunk,
            PROMO_CODE,
            i32::try_from(capacity)?
        )
        .execute(db)
        .await?;
    }
    Ok(())
}

/// `n` users straight into the database (no password hash: argon2 is not measured).
pub async fn users(db: &PgPool, n: u64) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(10_000) {
        let emails: Vec<String> = chunk.iter().map(|id| format!("load-{}@example.com", id.simple())).collect();
        sqlx::query!(
            "INSERT INTO users (id, email, name, password_hash)
             SELECT id, email, 'Load', 'not-a-password-hash' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
            chunk,
            &emails
        )
        .execute(db)
        .await?;
    }
    Ok(ids)
}

/// Bearer tokens for `users`, signed as the api signs them, valid for `ttl_secs`.
pub fn tokens(users: &[Uuid], jwt_secret: &str, ttl_secs: u64) -> anyhow::Result<Vec<String>> {
    let key = jsonwebtoken::EncodingKey::from_secret(jwt_secret.as_bytes());
    let now = Utc::now().timestamp();
    let exp = now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
    users
        .iter()
        .map(|id| {
            let claims = serde_json::json!({"sub": id, "role": "user", "iss": "turnstile", "iat": now, "exp": exp});
            Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
        })
        .collect()
}

/// Orders of these events still `QUEUED`.
pub async fn queued(db: &PgPool, events: &[Uuid]) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM orders WHERE event_id = ANY($1) AND status = 'QUEUED'"#,
        events
    )
    .fetch_one(db)
    .await
}

/// About how many orders of these events are still `QUEUED`, from their queues' counters
/// (numbers given less the serving counter) rather than a count of the orders: cheap enough
/// to ask every second of a million-order drain, which [`queued`] is not.
pub async fn queued_by_counters(db: &PgPool, events: &[Uuid]) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(sum(greatest(q.issued - e.queue_decided, 0)), 0)::int8 AS "count!"
           FROM event_queues q JOIN events e ON e.id = q.event_id WHERE q.event_id = ANY($1)"#,
        events
    )
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

/// Live tickets of these events, and by how many tickets events exceed their capacity plus
/// by how many ticket types exceed theirs, when `typed` (0 unless something is badly wrong).
/// Untyped runs do not read `ticket_types`, so they can measure builds older than it.
pub async fn sold_and_oversold(db: &PgPool, events: &[Uuid], typed: bool) -> sqlx::Result<(i64, i64)> {
    let totals = sqlx::query!(
        "SELECT sum(live)::int8 AS sold, sum(greatest(live - capacity, 0))::int8 AS oversold FROM (
             SELECT e.capacity, count(t.id) AS live
             FROM events e LEFT JOIN tickets t ON t.event_id = e.id AND t.status = 'ACTIVE'
             WHERE e.id = ANY($1) GROUP BY e.id) per_event",
        events
    )
    .fetch_one(db)
    .await?;
    let (sold, oversold) = (totals.sold, totals.oversold);
    if !typed {
        return Ok((sold.unwrap_or(0), oversold.unwrap_or(0)));
    }
    let types_oversold: Option<i64> = sqlx::query_scalar!(
        "SELECT sum(greatest(live - capacity, 0))::int8 FROM (
             SELECT tt.capacity, count(t.id) AS live
             FROM ticket_types tt LEFT JOIN tickets t ON t.ticket_type_id = tt.id AND t.status = 'ACTIVE'
             WHERE tt.event_id = ANY($1) AND tt.capacity IS NOT NULL GROUP BY tt.id) per_type",
        events
    )
    .fetch_one(db)
    .await?;
    Ok((sold.unwrap_or(0), oversold.unwrap_or(0) + types_oversold.unwrap_or(0)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The api refuses a token that would live longer than its `JWT_TTL_SECS`: the tokens
    /// live exactly as long as they are told to.
    #[test]
    fn tokens_live_as_long_as_the_api_issues_them_for() {
        let user = Uuid::now_v7();
        let token = tokens(&[user], "a-secret-of-the-benchmark-only-0000", 3600).unwrap().pop().unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["turnstile"]);
        let key = jsonwebtoken::DecodingKey::from_secret(b"a-secret-of-the-benchmark-only-0000");
        let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap().claims;
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
        assert_eq!(claims["sub"], user.to_string());
    }
}
