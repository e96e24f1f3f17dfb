//! Events: the public catalogue and the admin's way to add to it. This module holds the
//! model and the reads; [`edit`] creates, edits and deletes, [`image`] uploads and serves
//! an event's image.

mod draw;
mod edit;
mod image;

use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

/// The routes of events, their edits and their images (`image_max_bytes`: the upload's own
/// body limit).
pub fn router(image_max_bytes: u64) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events, edit::create_event))
        .routes(routes!(get_event, edit::update_event, edit::delete_event))
        .routes(routes!(image::get_image))
        .routes(routes!(draw::get_draw))
        .merge(image::upload_router(image_max_bytes))
}

/// An event as listed: `GET /events` and the pages of `/me` return these.
#[derive(Serialize, ToSchema)]
pub struct Event {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub location: String,
    pub organization: String,
    /// Audience rating label, e.g. `all-ages`, `18+`.
    pub rating: Option<String>,
    /// When the event starts (RFC 3339, UTC).
    pub date: DateTime<Utc>,
    /// Tickets over all its ticket types, at most (the venue cap).
    pub capacity: i32,
    /// Tickets not yet sold or held: `capacity - sold`.
    pub tickets_available: i32,
    /// Price of one ticket of the default type, a decimal string with at most 2 decimal
    /// places (editing one edits the other).
    #[schema(value_type = String, example = "49.90")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub price: Decimal,
    /// ISO 4217 code of `price`.
    #[schema(example = "EUR")]
    pub currency: String,
    /// Most tickets one order may buy, over all its lines.
    pub max_per_order: i32,
    /// Most tickets one buyer may hold over all their live (`PENDING`, `PAID`) orders;
    /// `null`: no cap.
    pub max_per_buyer: Option<i32>,
    /// The ticket type `{event_id, quantity}` orders buy ("General admission", made with the
    /// event); `null` once withdrawn.
    pub default_ticket_type_id: Option<Uuid>,
    pub image_url: Option<String>,
    /// Queue full: new orders are refused (`409 queue_full`) while the tickets the event's
    /// queued orders ask for would pass this many times what is left; `null`: the
    /// deployment's `QUEUE_DEMAND_FACTOR`.
    pub queue_demand_factor: Option<f64>,
    /// When the sale opens (`null`: on sale from creation): no ticket type sells before it.
    pub sales_start: Option<DateTime<Utc>>,
    /// When its pre-sale queue opens (`null`: none): orders from then until `sales_start`
    /// are placed in line by one random draw at `sales_start`.
    pub prequeue_opens_at: Option<DateTime<Utc>>,
    /// With a pre-sale: the SHA-256 of the draw's seed (hex), shown from the start, so the
    /// seed cannot be changed after entries came in.
    pub draw_seed_sha256: Option<String>,
    /// With a pre-sale, from `sales_start`: the draw's seed (hex, 32 bytes). The order of the
    /// draw is the entries sorted by SHA-256(seed ‖ order id's 16 bytes).
    pub draw_seed: Option<String>,
    /// When the draw happened.
    pub drawn_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// When the event was last edited (sales, which change `tickets_available`, are not edits).
    pub updated_at: DateTime<Utc>,
    /// When an admin deleted it; only admins see deleted events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// One event with its ticket types: what `GET`, `POST` and `PATCH` of one event answer.
#[derive(Serialize, ToSchema)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: Event,
    /// Its ticket types (hidden and withdrawn ones for admins only; those that require a
    /// promo code for admins and with `?promo_code=` a live code that names them).
    pub ticket_types: Vec<super::ticket_types::TicketType>,
    /// Its purchase queue now (admins only, on `GET /events/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueState>,
}

/// An event's purchase queue: what is waiting for the worker, and how fast it goes.
#[derive(Serialize, ToSchema)]
pub struct QueueState {
    /// Orders numbered and not yet decided (from the last queue number given and the
    /// highest decided: an order whose number was skipped counts until the worker passes it).
    pub orders: i64,
    /// Tickets those orders ask for.
    pub tickets: i64,
    /// Orders decided per second lately; `null` when none were decided in the last 30 s.
    pub decided_per_sec: Option<f64>,
}

impl EventDetail {
    /// `event` with its ticket types, read from `db` (see [`super::ticket_types::types_of`]).
    async fn of(db: &sqlx::PgPool, event: Event, admin: bool, promo_code: Option<&str>) -> Result<Self, ApiError> {
        let ticket_types = super::ticket_types::types_of(db, event.id, admin, promo_code).await?;
        Ok(Self { event, ticket_types, queue: None })
    }
}

async fn queue_state(db: &sqlx::PgPool, event_id: Uuid) -> Result<QueueState, ApiError> {
    Ok(sqlx::query_as!(
        QueueState,
        r#"SELECT greatest(q.issued - e.queue_decided, 0) AS "orders!",
                  greatest(q.tickets - e.queue_tickets_decided, 0) AS "tickets!",
                  CASE WHEN e.queue_decided_at > now() - interval '30 seconds' THEN e.queue_rate END AS decided_per_sec
           FROM events e JOIN event_queues q ON q.event_id = e.id WHERE e.id = $1"#,
        event_id
    )
    .fetch_one(db)
    .await?)
}

/// List events, newest first, soft-deleted ones hidden.
///
/// Paginated: when more events follow, the response carries `Link: <…>; rel="next"` and
/// `X-Next-Cursor`; pass that cursor back as `cursor`.
#[utoipa::path(get, path = "/events", tag = "events", params(PageQuery),
    responses(
        (status = 200, description = "One page of events", body = [Event],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
    ))]
pub async fn list_events(
    State(state): State<AppState>,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Event>>), ApiError> {
    let limit = query.limit()?;
    // One row more than asked tells whether another page follows.
    let mut events = page_of_events(&state.db, None, query.cursor, limit + 1).await?;
    let headers = query.finish("/api/v1/events", &mut events, |event| event.id);
    Ok((headers, Json(events)))
}

/// One event, with its ticket types and what is left of each. A deleted event is 404,
/// except for admins (it then has `deleted_at`).
#[utoipa::path(get, path = "/events/{id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), super::ticket_types::CodeQuery),
    responses(
        (status = 200, description = "The event", body = EventDetail),
        (status = 401, description = "A token was sent but is invalid", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn get_event(
    State(state): State<AppState>,
    user: Option<AuthUser>,
    Path(id): Path<Uuid>,
    Query(query): Query<super::ticket_types::CodeQuery>,
) -> Result<Json<EventDetail>, ApiError> {
    let admin = user.is_some_and(|user| user.is_admin());
    let event = load_event(&state.db, id, admin).await?;
    let mut detail = EventDetail::of(&state.db, event, admin, query.promo_code.as_deref()).await?;
    if admin {
        detail.queue = Some(queue_state(&state.db, id).await?);
    }
    Ok(Json(detail))
}

async fn load_event<'c>(db: impl sqlx::PgExecutor<'c>, id: Uuid, include_deleted: bool) -> Result<Event, ApiError> {
    events_by_id(db, &[id], include_deleted).await?.pop().ok_or(ApiError::NotFound("event"))
}

/// The events with these ids (deleted ones too, if `include_deleted`), soonest first: every
/// read of events by id goes through here, as every listing goes through [`page_of_events`].
pub(crate) async fn events_by_id<'c>(
    db: impl sqlx::PgExecutor<'c>,
    ids: &[Uuid],
    include_deleted: bool,
) -> Result<Vec<Event>, ApiError> {
    Ok(sqlx::query_as!(
        Event,
        r#"SELECT e.id, e.name, e.description, e.location, e.organization, e.rating, e.starts_at AS date,
                  e.capacity, e.capacity - e.sold AS "tickets_available!", e.price, e.currency,
                  e.max_per_order, e.max_per_buyer, e.default_ticket_type_id, e.image_url, e.queue_demand_factor,
                  e.sales_start, e.prequeue_opens_at, encode(sha256(e.draw_seed), 'hex') AS draw_seed_sha256,
                  CASE WHEN e.sales_start <= now() OR e.drawn_at IS NOT NULL THEN encode(e.draw_seed, 'hex') END
                      AS draw_seed,
                  e.drawn_at, e.created_at,
                  e.updated_at, e.deleted_at
           FROM events e WHERE e.id = ANY($1) AND (e.deleted_at IS NULL OR $2)
           ORDER BY e.starts_at, e.id"#,
        ids,
        include_deleted
    )
    .fetch_all(db)
    .await?)
}

/// Up to `limit` live events older than `cursor`, newest first; `created_by`: only those
/// that account created.
pub(crate) async fn page_of_events(
    db: &sqlx::PgPool,
    created_by: Option<Uuid>,
    cursor: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Event>, ApiError> {
    Ok(sqlx::query_as!(
        Event,
        r#"SELECT e.id, e.name, e.description, e.location, e.organization, e.rating, e.starts_at AS date,
                  e.capacity, e.capacity - e.sold AS "tickets_available!", e.price, e.currency,
                  e.max_per_order, e.max_per_buyer, e.default_ticket_type_id, e.image_url, e.queue_demand_factor,
                  e.sales_start, e.prequeue_opens_at, encode(sha256(e.draw_seed), 'hex') AS draw_seed_sha256,
                  CASE WHEN e.sales_start <= now() OR e.drawn_at IS NOT NULL THEN encode(e.draw_seed, 'hex') END
                      AS draw_seed,
                  e.drawn_at, e.created_at,
                  e.updated_at, e.deleted_at
           FROM events e
           WHERE e.deleted_at IS NULL AND ($1::uuid IS NULL OR e.created_by = $1)
             AND ($2::uuid IS NULL OR e.id < $2)
           ORDER BY e.id DESC
           LIMIT $3"#,
        created_by,
        cursor,
        limit
    )
    .fetch_all(db)
    .await?)
}
