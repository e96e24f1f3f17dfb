//! Events: the public catalogue and the admin's way to add to it.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use chrono::{DateTime, Datelike, Utc};
use common::domain::currency::{self, Currency};
use common::domain::money::{self, AmountText};
use common::domain::text;
use common::sales;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::{AdminUser, AuthUser};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", get(list_events).post(create_event))
        .route("/events/{id}", get(get_event).patch(update_event).delete(delete_event))
        .route("/events/{id}/image", get(get_image))
}

/// Largest price accepted: what `NUMERIC(12, 2)` holds.
const MAX_PRICE: Decimal = Decimal::from_parts(3_567_587_327, 232, 0, false, 2); // 9,999,999,999.99
pub(crate) const MAX_CAPACITY: i64 = 10_000_000;
pub(crate) const MAX_PER_ORDER: i64 = 1_000;
const DEFAULT_MAX_PER_ORDER: i64 = 10;

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
    /// Its ticket types (hidden and withdrawn ones for admins only).
    pub ticket_types: Vec<super::ticket_types::TicketType>,
}

impl EventDetail {
    /// `event` with its ticket types, read from `db`.
    async fn of(db: &sqlx::PgPool, event: Event, admin: bool) -> Result<Self, ApiError> {
        let ticket_types = super::ticket_types::types_of(db, event.id, admin).await?;
        Ok(Self { event, ticket_types })
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEventRequest {
    #[schema(example = "Turnstile Live")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[schema(example = "Olympiastadion, Berlin")]
    pub location: String,
    #[schema(example = "Turnstile Concerts GmbH")]
    pub organization: String,
    /// Audience rating label, at most 32 characters.
    pub rating: Option<String>,
    /// Start time, in the future and before the year 10000 (RFC 3339).
    pub date: DateTime<Utc>,
    /// Number of tickets, at least 1.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub capacity: i64,
    /// Ticket price, 0 or more (free events are allowed), at most 2 decimal places; a
    /// string (`"49.90"`) or a JSON number, taken exactly as written (digits and one point:
    /// no exponent, no `_`; nothing is rounded).
    #[schema(value_type = String, example = "49.90")]
    pub price: AmountText,
    /// ISO 4217 code of the price, in capitals (default `EUR`). A currency without minor
    /// units (`JPY`) takes whole prices only.
    #[schema(example = "EUR")]
    pub currency: Option<String>,
    /// Most tickets one order may buy (default 10).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_per_order: Option<i64>,
    /// Most tickets one buyer may hold over all their live orders, and with it at most
    /// [`MAX_PENDING_ORDERS_PER_BUYER`](common::sales::stock::MAX_PENDING_ORDERS_PER_BUYER) unpaid
    /// orders. Left out: the deployment's `DEFAULT_MAX_PER_BUYER`, or else the event's
    /// `max_per_order`. `null`, sent on purpose: no cap at all.
    #[schema(value_type = Option<i64>, minimum = 1)]
    #[serde(default, deserialize_with = "given")]
    pub max_per_buyer: Option<Option<i64>>,
    /// Absolute http(s) URL of an image.
    pub image_url: Option<String>,
}

/// A [`CreateEventRequest`] that passed every rule.
struct NewEvent {
    name: String,
    description: String,
    location: String,
    organization: String,
    rating: Option<String>,
    date: DateTime<Utc>,
    capacity: i32,
    price: Decimal,
    currency: Currency,
    max_per_order: i32,
    /// `None`: not given (the default applies); `Some(None)`: no cap, on purpose.
    max_per_buyer: Option<Option<i32>>,
    image_url: Option<String>,
}

/// A field that was given, `null` included (`Some(None)`), apart from one left out (`None`,
/// through `#[serde(default)]`).
fn given<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(value: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(value).map(Some)
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid("validation_failed", message)
}

pub(crate) fn required_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if text::has_control_characters(value, false) {
        return Err(invalid(format!("{field} {}", text::CONTROL_CHARACTERS)));
    }
    if value.chars().count() > max {
        return Err(invalid(format!("{field} must be at most {max} characters")));
    }
    Ok(value.to_owned())
}

fn optional_text(field: &str, value: Option<&str>, max: usize) -> Result<Option<String>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => required_text(field, value, max).map(Some),
        None => Ok(None),
    }
}

/// A price as sent (a string or a number, taken exactly as written): 0 or more, at most
/// [`MAX_PRICE`], with no more decimal places than `currency` has.
pub(crate) fn valid_price(text: &AmountText, currency: &Currency) -> Result<Decimal, ApiError> {
    let price = money::parse_exact(&text.0).map_err(|err| invalid(format!("price {err}")))?;
    if price.is_sign_negative() && !price.is_zero() {
        return Err(invalid("price must not be negative"));
    }
    if price > MAX_PRICE {
        return Err(invalid(format!("price must be at most {MAX_PRICE}")));
    }
    currency.check(price).map_err(|err| invalid(format!("price {err} ({currency})")))?;
    // `-0` is zero.
    Ok(price.max(Decimal::ZERO))
}

/// `patch` (fields of a creation request, as sent) applied to `current` (the resource as a
/// creation request), read back as a request: the edit then passes the creation rules.
/// Merged as JSON text, not `serde_json::Value`s: a price sent as a number keeps its exact
/// digits (a `Value` would hold it as a float). Unknown fields and wrong types are 422
/// `invalid_body`.
pub(crate) fn merge_patch<T: Serialize + serde::de::DeserializeOwned>(
    current: &T,
    patch: &BTreeMap<String, Box<RawValue>>,
) -> Result<T, ApiError> {
    let current_text = serde_json::to_string(current).map_err(anyhow::Error::from)?;
    let mut merged: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(&current_text).map_err(anyhow::Error::from)?;
    merged.extend(patch.iter().map(|(key, value)| (key.clone(), value.clone())));
    let merged = serde_json::to_string(&merged).map_err(anyhow::Error::from)?;
    serde_json::from_str(&merged).map_err(|err| ApiError::invalid("invalid_body", err.to_string()))
}

impl CreateEventRequest {
    fn validate(self, now: DateTime<Utc>) -> Result<NewEvent, ApiError> {
        self.validate_with(Some(now))
    }

    /// The rules; the date is only checked against `now` when given (an edit that leaves
    /// the date alone may edit an event that has started).
    fn validate_with(self, now: Option<DateTime<Utc>>) -> Result<NewEvent, ApiError> {
        if now.is_some_and(|now| self.date <= now) {
            return Err(invalid("date must be in the future"));
        }
        // RFC 3339 has four-digit years; later dates could not be written back.
        if self.date.year() > 9999 {
            return Err(invalid("date must be before the year 10000"));
        }
        if !(1..=MAX_CAPACITY).contains(&self.capacity) {
            return Err(invalid(format!("capacity must be between 1 and {MAX_CAPACITY}")));
        }
        let currency = match self.currency.as_deref() {
            Some(code) => Currency::parse(code).map_err(|err| invalid(format!("currency {err}")))?,
            None => currency::DEFAULT,
        };
        let price = valid_price(&self.price, &currency)?;
        let max_per_order = self.max_per_order.unwrap_or(DEFAULT_MAX_PER_ORDER);
        if !(1..=MAX_PER_ORDER).contains(&max_per_order) {
            return Err(invalid(format!("max_per_order must be between 1 and {MAX_PER_ORDER}")));
        }
        let max_per_buyer = match self.max_per_buyer {
            Some(Some(cap)) if !(1..=MAX_CAPACITY).contains(&cap) => {
                return Err(invalid(format!("max_per_buyer must be between 1 and {MAX_CAPACITY}")));
            }
            // In range: checked above.
            cap => cap.map(|cap| cap.map(|cap| cap as i32)),
        };
        let image_url = optional_text("image_url", self.image_url.as_deref(), 2048)?;
        if let Some(url) = &image_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(invalid("image_url must be an absolute http(s) URL"));
        }
        let description = self.description.trim();
        if description.chars().count() > 5000 {
            return Err(invalid("description must be at most 5000 characters"));
        }
        if text::has_control_characters(description, true) {
            return Err(invalid(format!("description {}", text::CONTROL_CHARACTERS)));
        }
        Ok(NewEvent {
            name: required_text("name", &self.name, 200)?,
            description: description.to_owned(),
            location: required_text("location", &self.location, 200)?,
            organization: required_text("organization", &self.organization, 200)?,
            rating: optional_text("rating", self.rating.as_deref(), 32)?,
            date: self.date,
            // In range: checked above.
            capacity: self.capacity as i32,
            price,
            currency,
            max_per_order: max_per_order as i32,
            max_per_buyer,
            image_url,
        })
    }
}

/// Create an event (admin).
#[utoipa::path(post, path = "/api/v1/events", tag = "events", request_body = CreateEventRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Event created", body = EventDetail,
            headers(("Location" = String, description = "URL of the new event"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`)", body = ErrorBody),
    ))]
pub async fn create_event(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Json(req): Json<CreateEventRequest>,
) -> Result<(StatusCode, HeaderMap, Json<EventDetail>), ApiError> {
    let new = req.validate(Utc::now())?;
    let max_per_buyer = new.max_per_buyer.unwrap_or_else(|| Some(default_max_per_buyer(&state, new.max_per_order)));
    let id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO events (id, name, description, location, organization, rating, starts_at, capacity, price,
                             currency, max_per_order, image_url, created_by, max_per_buyer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        id,
        &new.name,
        &new.description,
        &new.location,
        &new.organization,
        new.rating,
        new.date,
        new.capacity,
        new.price,
        new.currency.code(),
        new.max_per_order,
        new.image_url,
        admin.id,
        max_per_buyer
    )
    .execute(&state.db)
    .await?;
    let event = load_event(&state.db, id, false).await?;
    tracing::info!(event_id = %event.id, capacity = event.capacity, "event created");
    let location = super::location(&format!("/api/v1/events/{}", event.id));
    Ok((StatusCode::CREATED, location, Json(EventDetail::of(&state.db, event, true).await?)))
}

/// The buyer cap of an event created without one: `DEFAULT_MAX_PER_BUYER`, or the event's
/// `max_per_order` when that is 0 (so that one account cannot take a whole event by default).
fn default_max_per_buyer(state: &AppState, max_per_order: i32) -> i32 {
    match i32::try_from(state.config.default_max_per_buyer) {
        Ok(0) => max_per_order,
        Ok(cap) => cap,
        Err(_) => i32::MAX,
    }
}

/// List events, newest first, soft-deleted ones hidden.
///
/// Paginated: when more events follow, the response carries `Link: <…>; rel="next"` and
/// `X-Next-Cursor`; pass that cursor back as `cursor`.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(PageQuery),
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
#[utoipa::path(get, path = "/api/v1/events/{id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")),
    responses(
        (status = 200, description = "The event", body = EventDetail),
        (status = 401, description = "A token was sent but is invalid", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn get_event(
    State(state): State<AppState>,
    user: Option<AuthUser>,
    Path(id): Path<Uuid>,
) -> Result<Json<EventDetail>, ApiError> {
    let admin = user.is_some_and(|user| user.is_admin());
    let event = load_event(&state.db, id, admin).await?;
    Ok(Json(EventDetail::of(&state.db, event, admin).await?))
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
                  e.max_per_order, e.max_per_buyer, e.default_ticket_type_id, e.image_url, e.created_at,
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
                  e.max_per_order, e.max_per_buyer, e.default_ticket_type_id, e.image_url, e.created_at,
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

/// Edit an event (admin): send any subset of the fields of `POST /events`; `null` clears
/// `rating`, `image_url` or `description`. The same rules apply; a new `date` must be in
/// the future; `capacity` never below the tickets sold or held (409 `capacity_below_sold`).
/// A price or currency change applies to new orders only (orders keep the price and
/// currency they were placed at); a currency that cannot express another live ticket type's
/// price is refused (422 `invalid_price_for_currency`, naming the types).
#[utoipa::path(patch, path = "/api/v1/events/{id}", tag = "events", request_body = Object,
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The event as edited", body = EventDetail),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 409, description = "Capacity below the tickets sold or held (`capacity_below_sold`)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`) or is unknown (`invalid_body`); a new \
            currency cannot express the price of other ticket types (`invalid_price_for_currency`, naming them)",
            body = ErrorBody),
    ))]
pub async fn update_event(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    Json(patch): Json<BTreeMap<String, Box<RawValue>>>,
) -> Result<Json<EventDetail>, ApiError> {
    let mut tx = state.db.begin().await?;
    // The event's lock orders this edit with the allocator, which reads `sold`.
    let mut lock = sales::lock_live_event(&mut tx, id).await?.ok_or(ApiError::NotFound("event"))?;
    let current = load_event(lock.conn(), id, false).await?;
    let sold = current.capacity - current.tickets_available;
    let request = merge_patch(&CreateEventRequest::from(&current), &patch)?;
    let date_changed = patch.contains_key("date");
    let edited = request.validate_with(date_changed.then(Utc::now))?;
    if edited.currency.code() != current.currency {
        prices_fit(lock.conn(), id, current.default_ticket_type_id, edited.currency).await?;
    }
    if edited.capacity < sold {
        return Err(ApiError::conflict(
            "capacity_below_sold",
            format!("{sold} tickets are sold or held; capacity cannot go below that"),
        ));
    }
    sqlx::query!(
        "UPDATE events SET name = $2, description = $3, location = $4, organization = $5, rating = $6,
                  starts_at = $7, capacity = $8, price = $9, currency = $10, max_per_order = $11, image_url = $12,
                  max_per_buyer = $13, updated_at = now()
           WHERE id = $1",
        id,
        &edited.name,
        &edited.description,
        &edited.location,
        &edited.organization,
        edited.rating,
        edited.date,
        edited.capacity,
        edited.price,
        edited.currency.code(),
        edited.max_per_order,
        edited.image_url,
        // The current cap is part of the merged request: always given.
        edited.max_per_buyer.flatten()
    )
    .execute(lock.conn())
    .await?;
    // Capacity raised (or a cap lifted): the waiting list is offered what it can take first.
    sales::waitlist::offer(&mut lock, id, state.config.waitlist.offer_ttl()).await?;
    // Read after the offers, so that what they took is no longer available.
    let event = load_event(lock.conn(), id, false).await?;
    tx.commit().await?;
    // Other api processes hear of it from the `event_changes` notification.
    state.catalog.forget(id);
    tracing::info!(event_id = %id, admin_id = %admin.id, fields = ?patch.keys().collect::<Vec<_>>(), "event edited");
    Ok(Json(EventDetail::of(&state.db, event, true).await?))
}

/// 422 `invalid_price_for_currency`, naming them, when live ticket types of the event other
/// than its default one (whose price is the event's, checked with it) have prices that
/// `currency` cannot express: a change from EUR to JPY would otherwise sell a 199.50 VIP
/// ticket at 199.50 yen. Their prices are to be changed first.
async fn prices_fit(
    tx: &mut sqlx::PgConnection,
    event_id: Uuid,
    default_type: Option<Uuid>,
    currency: Currency,
) -> Result<(), ApiError> {
    let types = sqlx::query!(
        "SELECT name, price FROM ticket_types
         WHERE event_id = $1 AND deleted_at IS NULL AND id IS DISTINCT FROM $2 ORDER BY sort_order, id",
        event_id,
        default_type
    )
    .fetch_all(&mut *tx)
    .await?;
    let misfits: Vec<String> = types
        .into_iter()
        .filter(|t| currency.check(t.price).is_err())
        .map(|t| format!("{} ({})", t.name, t.price))
        .collect();
    if misfits.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        "invalid_price_for_currency",
        format!(
            "{currency} takes prices with at most {} decimal places; change the price of {} first",
            currency.places(),
            misfits.join(", ")
        ),
    ))
}

impl From<&Event> for CreateEventRequest {
    fn from(event: &Event) -> Self {
        Self {
            name: event.name.clone(),
            description: event.description.clone(),
            location: event.location.clone(),
            organization: event.organization.clone(),
            rating: event.rating.clone(),
            date: event.date,
            capacity: i64::from(event.capacity),
            price: AmountText::from(event.price),
            currency: Some(event.currency.clone()),
            max_per_order: Some(i64::from(event.max_per_order)),
            max_per_buyer: Some(event.max_per_buyer.map(i64::from)),
            image_url: event.image_url.clone(),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteEventQuery {
    /// `true`: refund every paid order, then delete. Also finishes a deletion with refunds
    /// that was interrupted.
    pub refund: Option<bool>,
}

/// Delete an event (admin): it disappears from the catalogue and from sale.
///
/// Every unpaid order is rejected with `EVENT_UNAVAILABLE` (`PENDING` holds release their
/// tickets; `QUEUED` orders are decided at once), each change published like any other,
/// the waiting list is closed, and the event is soft-deleted (`deleted_at`), all in one
/// transaction. Paid orders: without `?refund=true` the deletion is refused with 409
/// `event_has_paid_orders` (postpone the event by editing it instead); with it, they are
/// then refunded (`REFUNDED`, reason `EVENT_DELETED`, recorded for the payment provider in
/// `GET /refunds`) in batches, each order exactly once. The answer comes when all are
/// refunded; if this process stops midway, the workers finish the refunds (the event stays
/// deleted meanwhile), and asking again with `?refund=true` finishes them too.
#[utoipa::path(delete, path = "/api/v1/events/{id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), DeleteEventQuery), security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted (and, with `refund=true`, every paid order refunded)"),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or already deleted)", body = ErrorBody),
        (status = 409, description = "Paid orders exist and `refund=true` was not given (`event_has_paid_orders`)",
            body = ErrorBody),
    ))]
pub async fn delete_event(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    Query(query): Query<DeleteEventQuery>,
) -> Result<StatusCode, ApiError> {
    let refund = query.refund.unwrap_or(false);
    let mut tx = state.db.begin().await?;
    let mut lock = sales::lock_event(&mut tx, id).await?.ok_or(ApiError::NotFound("event"))?;
    let (deleted, refunding) = lock.event(id).map(|e| (e.deleted, e.refunding)).unwrap_or_default();
    if deleted && !(refund && refunding) {
        return Err(ApiError::NotFound("event"));
    }
    if !deleted {
        let paid: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM orders WHERE event_id = $1 AND status = 'PAID'"#,
            id
        )
        .fetch_one(lock.conn())
        .await?;
        if paid > 0 && !refund {
            return Err(ApiError::conflict(
                "event_has_paid_orders",
                format!("{paid} orders are paid; delete with ?refund=true to refund them, or postpone the event"),
            ));
        }
        let rejected = sales::changes::withdraw_event(&mut lock, id).await?;
        sqlx::query!(
            "UPDATE events SET deleted_at = now(), updated_at = now(), refunding_since = CASE WHEN $2 THEN now() END
             WHERE id = $1",
            id,
            paid > 0
        )
        .execute(lock.conn())
        .await?;
        tx.commit().await?;
        state.catalog.forget(id);
        tracing::info!(event_id = %id, admin_id = %admin.id, rejected_orders = rejected, paid_orders = paid,
            "event deleted");
    } else {
        drop(tx);
    }
    if refund {
        let mut refunded = 0;
        loop {
            let mut tx = state.db.begin().await?;
            let batch = state.config.deletion_refund_batch;
            let done = match sales::lock_event(&mut tx, id).await? {
                Some(mut lock) => sales::changes::refund_deleted_event(&mut lock, id, batch, Some(admin.id)).await?,
                None => 0,
            };
            tx.commit().await?;
            if done == 0 {
                break;
            }
            refunded += done;
        }
        if refunded > 0 {
            tracing::info!(event_id = %id, admin_id = %admin.id, refunded, "paid orders of a deleted event refunded");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The content types accepted for event images, recognised from the bytes.
const IMAGE_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];
/// The widest or tallest image accepted, in pixels.
const IMAGE_MAX_SIDE: u32 = 8_000;
/// The most pixels an image may have (25 megapixels: 100 MB decoded as 8-bit RGBA).
const IMAGE_MAX_PIXELS: u64 = 25_000_000;

/// Decodes the whole image (of the type its first bytes claim) within bounds on its
/// dimensions and on the memory decoding may take: a file that only starts like an image
/// (a PNG signature in front of HTML) is 415, one that claims more pixels than allowed 422
/// `image_too_large`, before anything is stored. Returns the image encoded anew in its
/// format, which is what is stored and served: only its pixels (turned as its EXIF
/// orientation says), never bytes appended to it or its metadata (a photo's location).
/// CPU-heavy: run it as `HeavyWork`.
fn check_image(bytes: &[u8], content_type: &str) -> Result<Vec<u8>, ApiError> {
    use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
    let format = match content_type {
        "image/png" => ImageFormat::Png,
        "image/jpeg" => ImageFormat::Jpeg,
        _ => ImageFormat::WebP,
    };
    let too_large = || {
        ApiError::invalid(
            "image_too_large",
            format!("images may be at most {IMAGE_MAX_SIDE} pixels wide and high and {IMAGE_MAX_PIXELS} pixels in all"),
        )
    };
    let refused = |err: ImageError| match err {
        ImageError::Limits(_) => too_large(),
        err => ApiError::UnsupportedMediaType(format!("the file is not a readable PNG, JPEG or WebP image: {err}")),
    };
    let reader = || {
        let mut limits = Limits::default();
        limits.max_image_width = Some(IMAGE_MAX_SIDE);
        limits.max_image_height = Some(IMAGE_MAX_SIDE);
        limits.max_alloc = Some(IMAGE_MAX_PIXELS * 4 + 16 * 1024 * 1024);
        let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
        reader.limits(limits);
        reader
    };
    let (width, height) = reader().into_dimensions().map_err(refused)?;
    if u64::from(width) * u64::from(height) > IMAGE_MAX_PIXELS {
        return Err(too_large());
    }
    let mut decoder = reader().into_decoder().map_err(refused)?;
    let orientation = decoder.orientation().map_err(refused)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(refused)?;
    image.apply_orientation(orientation);
    let mut encoded = std::io::Cursor::new(Vec::new());
    let written = match format {
        // Quality 90: a re-encoded photo keeps its look.
        ImageFormat::Jpeg => {
            image.to_rgb8().write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 90))
        }
        // PNG and (lossless) WebP keep every pixel.
        format => image.write_to(&mut encoded, format),
    };
    written.map_err(|err| ApiError::Internal(anyhow::anyhow!("encoding an uploaded image again: {err}")))?;
    Ok(encoded.into_inner())
}

// The form of `PUT /events/{id}/image`, for the API document (Swagger UI shows a file
// picker for it); the handler reads the multipart stream itself.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ImageUpload {
    /// PNG, JPEG or WebP.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// The router of `PUT /events/{id}/image`, with a body limit of its own (images are larger
/// than the JSON bodies everything else takes).
pub fn image_upload_router(max_bytes: u64) -> Router<AppState> {
    // Room for the multipart framing around the file.
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX).saturating_add(16 * 1024);
    Router::new()
        .route("/events/{id}/image", axum::routing::put(upload_image))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
}

/// Upload the event's image (admin): multipart form data with the file in a field named
/// `image`. PNG, JPEG and WebP are accepted, recognised by their content (not the file name
/// or the declared type), decoded whole and stored encoded anew (so only the pixels are kept:
/// nothing appended to the file, no metadata such as a photo's location); larger than
/// `IMAGE_MAX_BYTES` is 413, more than 8000 pixels a side or 25 megapixels 422. The event's `image_url`
/// then points at `GET /api/v1/events/{id}/image`.
#[utoipa::path(put, path = "/api/v1/events/{id}/image", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    request_body(content = inline(ImageUpload), content_type = "multipart/form-data",
        description = "Field `image`: the file"),
    responses(
        (status = 200, description = "The event with its new `image_url`", body = Event),
        (status = 400, description = "Not multipart, or no `image` field (`invalid_upload`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 413, description = "Image larger than IMAGE_MAX_BYTES", body = ErrorBody),
        (status = 415, description = "Not a readable PNG, JPEG or WebP image (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "More than 8000 pixels wide or high, or more than 25 megapixels \
            (`image_too_large`)", body = ErrorBody),
        (status = 503, description = "The image store is unavailable", body = ErrorBody),
    ))]
pub async fn upload_image(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Event>, ApiError> {
    let bad = |message: String| ApiError::BadRequest { code: "invalid_upload", message };
    let mut multipart = multipart.map_err(|err| bad(err.body_text()))?;
    load_event(&state.db, id, false).await?;
    let too_large = |err: &axum::extract::multipart::MultipartError| err.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let bytes = loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|err| if too_large(&err) { ApiError::PayloadTooLarge } else { bad(err.body_text()) })?
            .ok_or_else(|| bad("no field named `image` in the form".into()))?;
        if field.name() == Some("image") {
            break field
                .bytes()
                .await
                .map_err(|err| if too_large(&err) { ApiError::PayloadTooLarge } else { bad(err.body_text()) })?;
        }
    };
    if bytes.len() as u64 > state.config.image_max_bytes {
        return Err(ApiError::PayloadTooLarge);
    }
    let content_type = infer::get(&bytes)
        .map(|kind| kind.mime_type())
        .filter(|mime| IMAGE_TYPES.contains(mime))
        .ok_or_else(|| ApiError::UnsupportedMediaType("the image must be a PNG, JPEG or WebP file".into()))?;
    let bytes = state.heavy_work.run(move || check_image(&bytes, content_type)).await??;

    // A new key per upload: caches of the old image never serve the new one by mistake.
    let key = format!("events/{id}/{}", Uuid::new_v4().simple());
    state.images.put(&object_store::path::Path::from(key.as_str()), bytes.into()).await.map_err(|err| {
        tracing::error!(error = %err, event_id = %id, "storing an event image failed");
        ApiError::Unavailable
    })?;
    let url = format!("/api/v1/events/{id}/image");
    let previous: Option<Option<String>> = sqlx::query_scalar!(
        "WITH old AS (SELECT image_key FROM events WHERE id = $1 FOR NO KEY UPDATE)
         UPDATE events e SET image_key = $2, image_content_type = $3, image_url = $4, updated_at = now()
         FROM old WHERE e.id = $1 AND e.deleted_at IS NULL
         RETURNING old.image_key",
        id,
        &key,
        content_type,
        &url
    )
    .fetch_optional(&state.db)
    .await?;
    let previous = previous.ok_or(ApiError::NotFound("event"))?;
    if let Some(old) = previous.filter(|old| *old != key) {
        // Best effort: an orphaned object costs storage, never correctness.
        if let Err(err) = state.images.delete(&object_store::path::Path::from(old.as_str())).await {
            tracing::warn!(error = %err, event_id = %id, "could not delete the previous image");
        }
    }
    tracing::info!(event_id = %id, admin_id = %admin.id, content_type, "event image uploaded");
    load_event(&state.db, id, false).await.map(Json)
}

/// The event's uploaded image, with its content type; cacheable (the URL's content changes
/// only with a new upload, and its `ETag` says which).
#[utoipa::path(get, path = "/api/v1/events/{id}/image", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")),
    responses(
        (status = 200, description = "The image (PNG, JPEG or WebP)", content_type = "image/*", body = Vec<u8>),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 404, description = "No such event, or it has no uploaded image", body = ErrorBody),
        (status = 503, description = "The image store is unavailable", body = ErrorBody),
    ))]
pub async fn get_image(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::{HeaderValue, header};
    use axum::response::IntoResponse;
    let (key, content_type) = sqlx::query!(
        r#"SELECT image_key AS "image_key!", image_content_type AS "image_content_type!" FROM events
           WHERE id = $1 AND deleted_at IS NULL AND image_key IS NOT NULL AND image_content_type IS NOT NULL"#,
        id
    )
    .fetch_optional(&state.db)
    .await?
    .map(|row| (row.image_key, row.image_content_type))
    .ok_or(ApiError::NotFound("image"))?;
    let etag = format!("\"{}\"", key.rsplit('/').next().unwrap_or_default());
    let cache = HeaderValue::from_static("public, max-age=300");
    let etag_value = HeaderValue::from_str(&etag).map_err(anyhow::Error::from)?;
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok(
            (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)]).into_response()
        );
    }
    let bytes = state
        .images
        .get(&object_store::path::Path::from(key.as_str()))
        .await
        .map_err(|err| match err {
            object_store::Error::NotFound { .. } => ApiError::NotFound("image"),
            err => {
                tracing::error!(error = %err, event_id = %id, "reading an event image failed");
                ApiError::Unavailable
            }
        })?
        .bytes()
        .await
        .map_err(|err| {
            tracing::error!(error = %err, event_id = %id, "reading an event image failed");
            ApiError::Unavailable
        })?;
    let content_type = HeaderValue::from_str(&content_type).map_err(anyhow::Error::from)?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::ETAG, etag_value), (header::CACHE_CONTROL, cache)], bytes)
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(price: &str, capacity: i64) -> CreateEventRequest {
        CreateEventRequest {
            name: " Show ".into(),
            description: String::new(),
            location: "Hall".into(),
            organization: "Org".into(),
            rating: None,
            date: Utc::now() + chrono::Duration::days(1),
            capacity,
            price: price.parse().unwrap(),
            currency: None,
            max_per_order: None,
            max_per_buyer: None,
            image_url: None,
        }
    }

    #[test]
    fn currencies_are_iso_codes_and_prices_fit_them() {
        let now = Utc::now();
        assert_eq!(request("10.50", 5).validate(now).ok().map(|e| e.currency.code()), Some("EUR"));
        let in_currency =
            |code: &str, price: &str| CreateEventRequest { currency: Some(code.into()), ..request(price, 5) };
        assert_eq!(in_currency("JPY", "1500").validate(now).ok().map(|e| e.currency.code()), Some("JPY"));
        for (code, price) in [("JPY", "1500.50"), ("usd", "1"), ("EURO", "1"), ("XAU", "1"), ("QQQ", "1")] {
            let err = in_currency(code, price).validate(now).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("currency") || e.contains("price")), "{code} {price}");
        }
    }

    #[test]
    fn max_price_is_what_the_column_holds() {
        assert_eq!(MAX_PRICE.to_string(), "9999999999.99");
    }

    #[test]
    fn validates_money_and_capacity() {
        let ok = request("49.90", 100).validate(Utc::now()).unwrap();
        assert_eq!((ok.name.as_str(), ok.price.to_string().as_str(), ok.max_per_order), ("Show", "49.9", 10));
        assert!(request("0", 1).validate(Utc::now()).is_ok(), "free events are allowed");
        assert!(request("-0.01", 1).validate(Utc::now()).is_err());
        assert!(request("1.001", 1).validate(Utc::now()).is_err());
        assert!(request("1.100", 1).validate(Utc::now()).is_ok(), "trailing zeros are not extra places");
        assert!(request("10000000000", 1).validate(Utc::now()).is_err());
        assert!(request("1", 0).validate(Utc::now()).is_err());
        assert!(request("1", -5).validate(Utc::now()).is_err());
    }

    #[test]
    fn date_must_be_future() {
        let mut req = request("1", 1);
        req.date = Utc::now() - chrono::Duration::seconds(1);
        assert!(req.validate(Utc::now()).is_err());
    }
}
