//! The waiting list: buyers of a sold-out event (or ticket type) join it with the quantity
//! they want; tickets released later are offered to them in join order, as orders of their
//! own (`common::sales::waitlist`). Joining is checked like a purchase (the same rules and
//! limits), and only while the tickets wanted are not to be had.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use chrono::{DateTime, Utc};
use common::domain::WaitlistStatus;
use common::sales;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::{AdminUser, AuthUser};
use crate::error::{ApiError, ErrorBody, ResultExt};
use crate::extract::{Json, Path, Query};
use crate::purchase::{self, CreateOrderRequest, OrderItem, Purchase};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(event_waitlist, join, leave)).routes(routes!(my_waitlist))
}

/// The most waiting-list entries one buyer may have open (waiting or offered) at once,
/// over all events.
const MAX_OPEN_ENTRIES: i64 = 50;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Tickets wanted, within the same limits as a purchase (the type's and the event's
    /// `max_per_order` and `max_per_buyer`).
    #[schema(minimum = 1, example = 2)]
    pub quantity: i64,
    /// The ticket type wanted; the event's default type when left out.
    pub ticket_type_id: Option<Uuid>,
    /// A promo code of the event that names the type (checked as for a purchase): the
    /// offer is priced and counted under it, if it is still live then.
    pub promo_code: Option<String>,
}

/// A place on an event's waiting list.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitlistEntry {
    pub id: Uuid,
    pub event_id: Uuid,
    pub ticket_type_id: Uuid,
    pub user_id: Uuid,
    pub quantity: i32,
    /// `WAITING`; `OFFERED` (an order holds tickets for the buyer: `order_id`, to pay before
    /// its `expires_at`); `PURCHASED` (the offer was paid); `LAPSED` (the offer expired, was
    /// cancelled or its payment declined: the tickets went to the next entry); `LEFT`;
    /// `CLOSED` (the event was deleted).
    pub status: WaitlistStatus,
    /// 1 for the next entry to be offered tickets, among those `WAITING`; `null` otherwise.
    pub position: Option<i64>,
    /// The offer's order, once tickets were offered.
    pub order_id: Option<Uuid>,
    /// The promo code the entry carries, as the organizer wrote it.
    pub promo_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Join an event's waiting list (one open entry per buyer and event).
///
/// Accepted only while the tickets wanted cannot be bought: fewer than `quantity` are left
/// of the type (its own stock, and the venue's). Tickets released later (a hold expiring,
/// an order cancelled, a payment declined, a refund, capacity raised) are offered to the
/// entries in join order, each entry that fits getting an order of its own in `PENDING`
/// (reason `WAITLIST_OFFER`), held for `WAITLIST_OFFER_TTL_SECS`: an `order.pending` event
/// and webhook tell the buyer. An entry that does not fit keeps its place.
#[utoipa::path(post, path = "/events/{id}/waitlist", tag = "waitlist", request_body = JoinRequest,
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 201, description = "On the list", body = WaitlistEntry,
            headers(("Location" = String, description = "`/api/v1/me/waitlist`"))),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 409, description = "Tickets are available: buy them instead (`tickets_available`); already on \
            this event's list (`already_waiting`); too many open entries (`too_many_entries`)", body = ErrorBody),
        (status = 422, description = "Quantity out of range (`invalid_quantity`), unknown or withdrawn type \
            (`unknown_ticket_type`, `ticket_type_required`), type outside its sale window (`not_on_sale`), a type \
            sold only with a promo code (`promo_code_required`), a promo code that cannot be used \
            (`invalid_promo_code`), event over (`event_unavailable`)", body = ErrorBody),
    ))]
pub async fn join(
    State(state): State<AppState>,
    user: AuthUser,
    Path(event_id): Path<Uuid>,
    Json(req): Json<JoinRequest>,
) -> Result<(StatusCode, HeaderMap, Json<WaitlistEntry>), ApiError> {
    if req.quantity < 1 {
        return Err(ApiError::invalid("invalid_quantity", "quantity must be at least 1"));
    }
    // The same checks as a purchase of these tickets.
    let asked = CreateOrderRequest {
        event_id,
        quantity: req.ticket_type_id.is_none().then_some(req.quantity),
        items: req.ticket_type_id.map(|ticket_type_id| vec![OrderItem { ticket_type_id, quantity: req.quantity }]),
        promo_code: req.promo_code.clone(),
    };
    let priced = purchase::check(&state, &Purchase::parse(&asked)?).await?;
    let line = priced.lines.first().ok_or(ApiError::invalid("invalid_quantity", "no tickets asked for"))?;
    let type_id = line.ticket_type_id;
    let promo_code_id = priced.promo_code.as_ref().map(|(id, _)| *id);

    // Under the event's lock: what is left cannot change until the entry is in, so a
    // release either happened before (and the tickets are to be bought) or comes after
    // (and its offer pass sees the entry).
    let mut tx = state.db.begin().await?;
    may_join(&mut tx, event_id, type_id, user.id, line.quantity).await?;
    let id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO waitlist_entries (id, event_id, ticket_type_id, user_id, quantity, promo_code_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
        id,
        event_id,
        type_id,
        user.id,
        line.quantity,
        promo_code_id
    )
    .execute(&mut *tx)
    .await
    .on_constraint("waitlist_one_per_buyer", already_waiting)?;
    let entry = sqlx::query_as!(
        WaitlistEntry,
        r#"SELECT w.id, w.event_id, w.ticket_type_id, w.user_id, w.quantity, w.status AS "status: WaitlistStatus",
                  w.order_id, c.code AS "promo_code?", w.created_at, w.updated_at,
                  CASE WHEN w.status = 'WAITING' THEN (
                      SELECT count(*) FROM waitlist_entries ahead
                      WHERE ahead.event_id = w.event_id AND ahead.status = 'WAITING' AND ahead.id <= w.id
                  ) END AS position
           FROM waitlist_entries w LEFT JOIN promo_codes c ON c.id = w.promo_code_id WHERE w.id = $1"#,
        id
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%event_id, entry_id = %id, user_id = %user.id, quantity = line.quantity, "joined the waiting list");
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, header::HeaderValue::from_static("/api/v1/me/waitlist"));
    Ok((StatusCode::CREATED, headers, Json(entry)))
}

/// Whether `user_id` may join the waiting list of `event_id` for `quantity` tickets of
/// `type_id`: the event and type exist, the buyer is not waiting already, the tickets are
/// not to be had (else: buy them), and the buyer has room for another open entry. Takes the
/// event's lock in `tx`.
async fn may_join(
    tx: &mut sqlx::PgConnection,
    event_id: Uuid,
    type_id: Uuid,
    user_id: Uuid,
    quantity: i32,
) -> Result<(), ApiError> {
    let mut lock = sales::lock_live_event(tx, event_id).await?.ok_or(ApiError::NotFound("event"))?;
    let events = sales::stock::load(&mut lock).await?;
    let event = events.get(&event_id).ok_or(ApiError::NotFound("event"))?;
    let type_stock = event.types.get(&type_id).filter(|t| !t.withdrawn).ok_or(ApiError::NotFound("event"))?;
    let waiting: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM waitlist_entries
                        WHERE event_id = $1 AND user_id = $2 AND status IN ('WAITING', 'OFFERED')) AS "exists!""#,
        event_id,
        user_id
    )
    .fetch_one(lock.conn())
    .await?;
    if waiting {
        return Err(already_waiting());
    }
    // A type without stock of its own (`capacity` null) is limited by the venue only.
    let available = type_stock.left.map_or(event.venue_left, |type_left| type_left.min(event.venue_left));
    if available >= i64::from(quantity) {
        return Err(ApiError::conflict(
            "tickets_available",
            format!("{available} tickets are available: buy them with POST /api/v1/orders"),
        ));
    }
    // Counted under the buyer's row lock (taken after the event's, as everywhere), so that
    // concurrent joins to different events cannot each see room for one more.
    super::accounts::lock_account(lock.conn(), user_id).await?;
    let open: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM waitlist_entries WHERE user_id = $1 AND status IN ('WAITING', 'OFFERED')"#,
        user_id
    )
    .fetch_one(lock.conn())
    .await?;
    if open >= MAX_OPEN_ENTRIES {
        return Err(ApiError::conflict(
            "too_many_entries",
            format!("at most {MAX_OPEN_ENTRIES} waiting-list entries may be open at once; leave one first"),
        ));
    }
    Ok(())
}

fn already_waiting() -> ApiError {
    ApiError::conflict("already_waiting", "you are on this event's waiting list already")
}

/// Leave an event's waiting list. An entry holding an offer is not left this way: pay the
/// offer's order or cancel it (`POST /orders/{id}/cancel`), which passes the tickets on.
#[utoipa::path(delete, path = "/events/{id}/waitlist", tag = "waitlist",
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 204, description = "Left"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "Not on this event's waiting list", body = ErrorBody),
        (status = 409, description = "The entry holds an offer (`offer_pending`): pay or cancel its order", body = ErrorBody),
    ))]
pub async fn leave(
    State(state): State<AppState>,
    user: AuthUser,
    Path(event_id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    // The event's lock first, as the offers take it: an offer made from released tickets
    // either committed before (the entry is `OFFERED`: 409) or sees the entry `LEFT`.
    let mut tx = state.db.begin().await?;
    // No event, no entry.
    let mut lock = sales::lock_event(&mut tx, event_id).await?.ok_or(ApiError::NotFound("waiting-list entry"))?;
    let open = sqlx::query!(
        r#"WITH left_now AS (
               UPDATE waitlist_entries SET status = 'LEFT', updated_at = now()
               WHERE event_id = $1 AND user_id = $2 AND status = 'WAITING' RETURNING id, status, order_id
           )
           SELECT id AS "id!", status AS "status!: WaitlistStatus", order_id FROM left_now
           UNION ALL
           SELECT id, status, order_id FROM waitlist_entries
           WHERE event_id = $1 AND user_id = $2 AND status = 'OFFERED'"#,
        event_id,
        user.id
    )
    .fetch_optional(lock.conn())
    .await?
    .map(|row| (row.id, row.status, row.order_id));
    tx.commit().await?;
    match open {
        None => Err(ApiError::NotFound("waiting-list entry")),
        Some((_, WaitlistStatus::Offered, order_id)) => Err(ApiError::conflict(
            "offer_pending",
            format!(
                "tickets are held for you in order {}: pay it, or cancel it to pass them on",
                order_id.map(|id| id.to_string()).unwrap_or_default()
            ),
        )),
        Some((entry_id, ..)) => {
            tracing::info!(%event_id, %entry_id, user_id = %user.id, "left the waiting list");
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// The caller's waiting-list entries, newest first (all statuses, with the position of those
/// still waiting).
#[utoipa::path(get, path = "/me/waitlist", tag = "waitlist", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the caller's entries", body = [WaitlistEntry],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ))]
pub async fn my_waitlist(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<WaitlistEntry>>), ApiError> {
    let limit = query.limit()?;
    let mut rows = sqlx::query_as!(
        WaitlistEntry,
        r#"SELECT w.id, w.event_id, w.ticket_type_id, w.user_id, w.quantity, w.status AS "status: WaitlistStatus",
                  w.order_id, c.code AS "promo_code?", w.created_at, w.updated_at,
                  CASE WHEN w.status = 'WAITING' THEN (
                      SELECT count(*) FROM waitlist_entries ahead
                      WHERE ahead.event_id = w.event_id AND ahead.status = 'WAITING' AND ahead.id <= w.id
                  ) END AS position
           FROM waitlist_entries w LEFT JOIN promo_codes c ON c.id = w.promo_code_id
           WHERE w.user_id = $1 AND ($2::uuid IS NULL OR w.id < $2)
           ORDER BY w.id DESC LIMIT $3"#,
        user.id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/me/waitlist", &mut rows, |row| row.id);
    Ok((headers, Json(rows)))
}

/// An event's open waiting list in join order (admin): the entries waiting, with their
/// positions, and those holding an offer. Deleted events keep their lists (closed).
#[utoipa::path(get, path = "/events/{id}/waitlist", tag = "waitlist",
    params(("id" = Uuid, Path, description = "Event id"), PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of entries, first in line first", body = [WaitlistEntry],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn event_waitlist(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(event_id): Path<Uuid>,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<WaitlistEntry>>), ApiError> {
    let limit = query.limit()?;
    let exists: bool =
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM events WHERE id = $1) AS "exists!""#, event_id)
            .fetch_one(&state.db)
            .await?;
    if !exists {
        return Err(ApiError::NotFound("event"));
    }
    let mut rows = sqlx::query_as!(
        WaitlistEntry,
        r#"SELECT w.id, w.event_id, w.ticket_type_id, w.user_id, w.quantity, w.status AS "status: WaitlistStatus",
                  w.order_id, c.code AS "promo_code?", w.created_at, w.updated_at,
                  CASE WHEN w.status = 'WAITING' THEN (
                      SELECT count(*) FROM waitlist_entries ahead
                      WHERE ahead.event_id = w.event_id AND ahead.status = 'WAITING' AND ahead.id <= w.id
                  ) END AS position
           FROM waitlist_entries w LEFT JOIN promo_codes c ON c.id = w.promo_code_id
           WHERE w.event_id = $1 AND w.status IN ('WAITING', 'OFFERED') AND ($2::uuid IS NULL OR w.id > $2)
           ORDER BY w.id LIMIT $3"#,
        event_id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish(&format!("/api/v1/events/{event_id}/waitlist"), &mut rows, |row| row.id);
    Ok((headers, Json(rows)))
}
