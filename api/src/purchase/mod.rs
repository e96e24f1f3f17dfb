//! The api's half of the purchase path, beside the HTTP routes that use it: the rules a
//! purchase passes before it is stored ([`rules`], pure), the catalogue of events they read
//! from memory ([`catalog`]), the sold-out fast path's hints ([`sold_out_hints`]), the
//! inserter that stores orders `QUEUED` and sends their messages ([`order_inserter`]), and
//! the watch that wakes long-polls when an order changes ([`order_watch`]).

pub mod catalog;
pub mod order_inserter;
pub mod order_watch;
pub mod rules;
pub mod sold_out_hints;

use chrono::Utc;
use uuid::Uuid;

pub use rules::{CreateOrderRequest, OrderItem, Priced, Purchase};

use crate::error::ApiError;
use crate::state::AppState;

/// Readies the database side of the purchase path before the first buyer, and returns the
/// connection the order inserter is to keep. A new server process's first run of a
/// statement costs it milliseconds of catalogue reads and planning, which the first buyers
/// would otherwise wait for: each of the pool's idle connections (those
/// `DATABASE_MIN_CONNECTIONS` opened) runs the catalogue's read once, and the inserter's
/// also runs its statements, on nothing.
pub async fn warm_up(
    db: &sqlx::PgPool,
    settings: order_inserter::Settings,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    // All held at once, so that each is a different connection.
    let mut connections = Vec::new();
    for _ in 0..db.num_idle().max(1) {
        connections.push(db.acquire().await?);
    }
    for conn in &mut connections {
        catalog::read(&mut **conn, Uuid::nil()).await?;
    }
    let mut inserters = connections.swap_remove(0);
    order_inserter::warm(&mut inserters, settings).await?;
    Ok(inserters)
}

/// [`rules::price`] against the event as the catalogue has it now: 404 when there is no
/// such event (or it was deleted). A promo code the catalogue does not know is looked up to
/// say whether it was withdrawn.
pub async fn check(state: &AppState, purchase: &Purchase) -> Result<Priced, ApiError> {
    let event = state.catalog.get(&state.db, purchase.event_id).await?.ok_or(ApiError::NotFound("event"))?;
    if let Some(code) = &purchase.promo_code
        && event.promo_code(code).is_none()
    {
        return Err(unknown_promo_code(state, purchase.event_id, code).await?);
    }
    rules::price(event, purchase, Utc::now())
}

/// `422 invalid_promo_code` for a code that is not live: withdrawn, or never made.
async fn unknown_promo_code(state: &AppState, event_id: Uuid, code: &str) -> Result<ApiError, ApiError> {
    let withdrawn = sqlx::query_scalar!(
        r#"SELECT true AS "withdrawn!" FROM promo_codes
           WHERE event_id = $1 AND lower(code) = lower($2) AND withdrawn_at IS NOT NULL LIMIT 1"#,
        event_id,
        code
    )
    .fetch_optional(&state.db)
    .await?
    .is_some();
    Ok(rules::invalid_promo_code(if withdrawn {
        format!("the promo code {code} was withdrawn")
    } else {
        format!("{code} is not a promo code of this event")
    }))
}

/// The sold-out fast path's view of the tickets left (the venue cap; a type's own stock is
/// the worker's to check): a recent reading that said too few is trusted (that is what
/// spares the database a stampede on a sold-out event); anything else is read afresh, and
/// remembered.
pub async fn tickets_left(state: &AppState, event_id: Uuid, quantity: i32) -> Result<i32, ApiError> {
    if let Some(hint) = state.sold_out.get(event_id)
        && hint.available < quantity
    {
        return Ok(hint.available);
    }
    let available: i32 =
        sqlx::query_scalar!(r#"SELECT capacity - sold AS "left!" FROM events WHERE id = $1"#, event_id)
            .fetch_optional(&state.db)
            .await?
            .ok_or(ApiError::NotFound("event"))?;
    state.sold_out.record(event_id, available);
    Ok(available)
}
