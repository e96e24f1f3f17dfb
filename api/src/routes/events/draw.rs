//! An event's pre-sale draw, for its admins: the seed, the entries and the order the draw
//! gave them, so that anyone handed them can recompute it.

use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::routes::page::PageQuery;
use crate::state::AppState;

/// An event's pre-sale draw, and one page of its entries.
#[derive(Serialize, ToSchema)]
pub struct Draw {
    pub event_id: Uuid,
    pub prequeue_opens_at: Option<DateTime<Utc>>,
    pub sales_start: Option<DateTime<Utc>>,
    /// SHA-256 of the seed (hex), fixed when the pre-sale was set.
    pub seed_sha256: Option<String>,
    /// The seed (hex, 32 bytes), from `sales_start`.
    pub seed: Option<String>,
    /// When the draw happened; `null` before.
    pub drawn_at: Option<DateTime<Utc>>,
    /// Entries in the draw (once drawn), or open entries waiting for it.
    pub entry_count: i64,
    /// One page of the entries, newest first (see `Link`).
    pub entries: Vec<DrawEntry>,
}

/// One pre-sale entry.
#[derive(Serialize, ToSchema)]
pub struct DrawEntry {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    /// Its place in the event's queue, from the draw (`null` before it).
    pub queue_number: Option<i64>,
    /// SHA-256(seed ‖ order id's 16 bytes), hex: the draw sorts the entries by it, ascending
    /// (`null` before the draw).
    pub key: Option<String>,
}

/// An event's pre-sale draw (admin): the seed's hash, and from `sales_start` the seed; its
/// entries (paginated), and once drawn each one's key and queue number. To check the draw,
/// sort the entries by SHA-256 of the seed's 32 bytes followed by the order id's 16 bytes:
/// the queue numbers follow that order (README, "A pre-sale queue drawn by lot").
#[utoipa::path(get, path = "/events/{id}/draw", tag = "events", params(("id" = Uuid, Path, description = "Event id"), PageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The draw and one page of its entries", body = Draw,
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more entries follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event, or it has no pre-sale", body = ErrorBody),
    ))]
pub async fn get_draw(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Path(id): Path<Uuid>,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Draw>), ApiError> {
    let limit = query.limit()?;
    let draw = sqlx::query!(
        r#"SELECT e.prequeue_opens_at, e.sales_start, encode(sha256(e.draw_seed), 'hex') AS seed_sha256,
                  CASE WHEN e.sales_start <= now() OR e.drawn_at IS NOT NULL THEN encode(e.draw_seed, 'hex') END AS seed,
                  e.drawn_at,
                  (SELECT count(*) FROM orders o WHERE o.event_id = e.id AND o.presale_entry
                      AND (o.queue_number IS NOT NULL OR o.status = 'QUEUED')) AS "entry_count!"
           FROM events e WHERE e.id = $1 AND e.deleted_at IS NULL AND e.draw_seed IS NOT NULL"#,
        id
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or(ApiError::NotFound("pre-sale draw"))?;
    let mut entries = sqlx::query_as!(
        DrawEntry,
        r#"SELECT o.id AS order_id, o.user_id, o.created_at, o.queue_number,
                  CASE WHEN o.queue_number IS NOT NULL THEN encode(draw_key(e.draw_seed, o.id), 'hex') END AS key
           FROM orders o JOIN events e ON e.id = o.event_id
           WHERE o.event_id = $1 AND o.presale_entry AND (o.queue_number IS NOT NULL OR o.status = 'QUEUED')
             AND ($2::uuid IS NULL OR o.id < $2)
           ORDER BY o.id DESC LIMIT $3"#,
        id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish(&format!("/api/v1/events/{id}/draw"), &mut entries, |entry| entry.order_id);
    Ok((
        headers,
        Json(Draw {
            event_id: id,
            prequeue_opens_at: draw.prequeue_opens_at,
            sales_start: draw.sales_start,
            seed_sha256: draw.seed_sha256,
            seed: draw.seed,
            drawn_at: draw.drawn_at,
            entry_count: draw.entry_count,
            entries,
        }),
    ))
}
