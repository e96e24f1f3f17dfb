//! Events: the public catalogue and the admin's way to add to it.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/events", get(list_events).post(create_event)).route("/events/{id}", get(get_event))
}

/// The columns of [`Event`], for every query that returns events.
macro_rules! event_columns {
    () => {
        "e.id, e.name, e.description, e.location, e.organization, e.rating, e.starts_at, \
         e.capacity, e.capacity - e.sold AS tickets_available, e.price, e.max_per_order, \
         e.image_url, e.created_at, e.updated_at"
    };
}
pub(crate) use event_columns;

/// Largest price accepted: what `NUMERIC(12, 2)` holds.
const MAX_PRICE: Decimal = Decimal::from_parts(3_567_587_327, 232, 0, false, 2); // 9,999,999,999.99
const MAX_CAPACITY: i64 = 10_000_000;
const MAX_PER_ORDER: i64 = 1_000;
const DEFAULT_MAX_PER_ORDER: i64 = 10;

#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct Event {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub location: String,
    pub organization: String,
    /// Audience rating label, e.g. `all-ages`, `18+`.
    pub rating: Option<String>,
    /// When the event starts (RFC 3339, UTC).
    #[serde(rename = "date")]
    #[sqlx(rename = "starts_at")]
    pub date: DateTime<Utc>,
    pub capacity: i32,
    /// Tickets not yet sold or held: `capacity - sold`.
    pub tickets_available: i32,
    /// Price of one ticket, a decimal string with at most 2 decimal places.
    #[schema(value_type = String, example = "49.90")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub price: Decimal,
    /// Most tickets one order may buy.
    pub max_per_order: i32,
    pub image_url: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Deserialize, ToSchema)]
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
    /// Start time, in the future (RFC 3339).
    pub date: DateTime<Utc>,
    /// Number of tickets, at least 1.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub capacity: i64,
    /// Ticket price, 0 or more (free events are allowed), at most 2 decimal places; a
    /// string (`"49.90"`) or a JSON number.
    #[schema(value_type = String, example = "49.90")]
    pub price: Decimal,
    /// Most tickets one order may buy (default 10).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_per_order: Option<i64>,
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
    max_per_order: i32,
    image_url: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid("validation_failed", message)
}

fn required_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
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

impl CreateEventRequest {
    fn validate(self, now: DateTime<Utc>) -> Result<NewEvent, ApiError> {
        if self.date <= now {
            return Err(invalid("date must be in the future"));
        }
        if !(1..=MAX_CAPACITY).contains(&self.capacity) {
            return Err(invalid(format!("capacity must be between 1 and {MAX_CAPACITY}")));
        }
        if self.price.is_sign_negative() && !self.price.is_zero() {
            return Err(invalid("price must not be negative"));
        }
        if self.price.normalize().scale() > 2 {
            return Err(invalid("price must have at most 2 decimal places"));
        }
        if self.price > MAX_PRICE {
            return Err(invalid(format!("price must be at most {MAX_PRICE}")));
        }
        let max_per_order = self.max_per_order.unwrap_or(DEFAULT_MAX_PER_ORDER);
        if !(1..=MAX_PER_ORDER).contains(&max_per_order) {
            return Err(invalid(format!("max_per_order must be between 1 and {MAX_PER_ORDER}")));
        }
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
        Ok(NewEvent {
            name: required_text("name", &self.name, 200)?,
            description: description.to_owned(),
            location: required_text("location", &self.location, 200)?,
            organization: required_text("organization", &self.organization, 200)?,
            rating: optional_text("rating", self.rating.as_deref(), 32)?,
            date: self.date,
            // In range: checked above.
            capacity: self.capacity as i32,
            price: self.price.normalize().max(Decimal::ZERO),
            max_per_order: max_per_order as i32,
            image_url,
        })
    }
}

/// Create an event (admin).
#[utoipa::path(post, path = "/api/v1/events", tag = "events", request_body = CreateEventRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Event created", body = Event,
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
) -> Result<(StatusCode, HeaderMap, Json<Event>), ApiError> {
    let new = req.validate(Utc::now())?;
    let event = sqlx::query_as::<_, Event>(concat!(
        "INSERT INTO events AS e (id, name, description, location, organization, rating, starts_at,
                                  capacity, price, max_per_order, image_url, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING ",
        event_columns!()
    ))
    .bind(Uuid::now_v7())
    .bind(&new.name)
    .bind(&new.description)
    .bind(&new.location)
    .bind(&new.organization)
    .bind(&new.rating)
    .bind(new.date)
    .bind(new.capacity)
    .bind(new.price)
    .bind(new.max_per_order)
    .bind(&new.image_url)
    .bind(admin.id)
    .fetch_one(&state.db)
    .await?;
    tracing::info!(event_id = %event.id, capacity = event.capacity, "event created");
    Ok((StatusCode::CREATED, super::location(&format!("/api/v1/events/{}", event.id)), Json(event)))
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
    let mut events = sqlx::query_as::<_, Event>(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events e
          WHERE e.deleted_at IS NULL AND ($1::uuid IS NULL OR e.id < $1)
          ORDER BY e.id DESC
          LIMIT $2"
    ))
    .bind(query.cursor)
    .bind(limit + 1)
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/events", &mut events, |event| event.id);
    Ok((headers, Json(events)))
}

/// One event.
#[utoipa::path(get, path = "/api/v1/events/{id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")),
    responses(
        (status = 200, description = "The event", body = Event),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn get_event(State(state): State<AppState>, Path(id): Path<Uuid>) -> Result<Json<Event>, ApiError> {
    sqlx::query_as::<_, Event>(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events e WHERE e.id = $1 AND e.deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("event"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn request(price: &str, capacity: i64) -> CreateEventRequest {
        CreateEventRequest {
            name: " Show ".into(),
            description: String::new(),
            location: "Hall".into(),
            organization: "Org".into(),
            rating: None,
            date: Utc::now() + chrono::Duration::days(1),
            capacity,
            price: Decimal::from_str(price).unwrap(),
            max_per_order: None,
            image_url: None,
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
