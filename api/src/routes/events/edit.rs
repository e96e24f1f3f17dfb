//! Creating, editing and deleting events (admin).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike, Utc};
use common::domain::currency::{self, Currency};
use common::domain::money::AmountText;
use common::domain::text;
use common::sales;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Event, EventDetail, load_event};
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::routes::input::{
    MAX_CAPACITY, MAX_PER_ORDER, given, invalid, merge_patch, optional_text, required_text, valid_price,
};
use crate::state::AppState;

const DEFAULT_MAX_PER_ORDER: i64 = 10;

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
    /// Queue full: new orders are refused (`409 queue_full`) while the tickets its queued
    /// orders ask for would pass this many times what is left; 1 to 10000. Left out or
    /// `null`: the deployment's `QUEUE_DEMAND_FACTOR`.
    #[schema(value_type = Option<f64>, minimum = 1, maximum = 10000, example = 3)]
    #[serde(default, deserialize_with = "given")]
    pub queue_demand_factor: Option<Option<f64>>,
    /// When the sale opens: no ticket type sells before it (types keep their own windows
    /// inside it). Before the event's date.
    #[schema(value_type = Option<DateTime<Utc>>)]
    #[serde(default, deserialize_with = "given")]
    pub sales_start: Option<Option<DateTime<Utc>>>,
    /// When the pre-sale queue opens, before `sales_start` (which it requires): orders from
    /// then on are pre-sale entries, placed in line by one random draw at `sales_start`.
    /// Neither time can change once the pre-sale queue has opened.
    #[schema(value_type = Option<DateTime<Utc>>)]
    #[serde(default, deserialize_with = "given")]
    pub prequeue_opens_at: Option<Option<DateTime<Utc>>>,
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
    queue_demand_factor: Option<f64>,
    sales_start: Option<DateTime<Utc>>,
    prequeue_opens_at: Option<DateTime<Utc>>,
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
        let queue_demand_factor = self.queue_demand_factor.flatten();
        if queue_demand_factor.is_some_and(|factor| !(1.0..=10_000.0).contains(&factor)) {
            return Err(invalid("queue_demand_factor must be between 1 and 10000, or null for the deployment's"));
        }
        let (sales_start, prequeue_opens_at) = (self.sales_start.flatten(), self.prequeue_opens_at.flatten());
        match (sales_start, prequeue_opens_at) {
            (Some(start), _) if start >= self.date => {
                return Err(invalid("sales_start must be before the event's date"));
            }
            (None, Some(_)) => return Err(invalid("prequeue_opens_at needs a sales_start")),
            (Some(start), Some(opens)) if opens >= start => {
                return Err(invalid("prequeue_opens_at must be before sales_start"));
            }
            _ => {}
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
            queue_demand_factor,
            sales_start,
            prequeue_opens_at,
        })
    }
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
            queue_demand_factor: Some(event.queue_demand_factor),
            sales_start: Some(event.sales_start),
            prequeue_opens_at: Some(event.prequeue_opens_at),
        }
    }
}

/// Create an event (admin).
#[utoipa::path(post, path = "/events", tag = "events", request_body = CreateEventRequest,
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
                             currency, max_per_order, image_url, created_by, max_per_buyer, queue_demand_factor,
                             sales_start, prequeue_opens_at, draw_seed)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
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
        max_per_buyer,
        new.queue_demand_factor,
        new.sales_start,
        new.prequeue_opens_at,
        new.prequeue_opens_at.map(|_| draw_seed())
    )
    .execute(&state.db)
    .await?;
    let event = load_event(&state.db, id, false).await?;
    tracing::info!(event_id = %event.id, capacity = event.capacity, "event created");
    let location = crate::routes::location(&format!("/api/v1/events/{}", event.id));
    Ok((StatusCode::CREATED, location, Json(EventDetail::of(&state.db, event, true, None).await?)))
}

/// A pre-sale draw's seed: 32 random bytes, made when the pre-sale is set (before it opens).
fn draw_seed() -> Vec<u8> {
    rand::random::<[u8; 32]>().to_vec()
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

/// Edit an event (admin): send any subset of the fields of `POST /events`; `null` clears
/// `rating`, `image_url` or `description`. The same rules apply; a new `date` must be in
/// the future; `capacity` never below the tickets sold or held (409 `capacity_below_sold`).
/// A price or currency change applies to new orders only (orders keep the price and
/// currency they were placed at); a currency that cannot express another live ticket type's
/// price is refused (422 `invalid_price_for_currency`, naming the types).
#[utoipa::path(patch, path = "/events/{id}", tag = "events", request_body = Object,
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The event as edited", body = EventDetail),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 409, description = "Capacity below the tickets sold or held (`capacity_below_sold`); `sales_start` \
            or `prequeue_opens_at` changed after the pre-sale queue opened (`presale_started`)", body = ErrorBody),
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
    presale_unchanged(&current, &edited, Utc::now())?;
    sqlx::query!(
        "UPDATE events SET name = $2, description = $3, location = $4, organization = $5, rating = $6,
                  starts_at = $7, capacity = $8, price = $9, currency = $10, max_per_order = $11, image_url = $12,
                  max_per_buyer = $13, queue_demand_factor = $14, sales_start = $15, prequeue_opens_at = $16,
                  draw_seed = CASE WHEN $16::timestamptz IS NULL THEN NULL ELSE coalesce(draw_seed, $17) END,
                  updated_at = now()
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
        edited.max_per_buyer.flatten(),
        edited.queue_demand_factor,
        edited.sales_start,
        edited.prequeue_opens_at,
        draw_seed()
    )
    .execute(lock.conn())
    .await?;
    // A pre-sale set (or removed) before it opened: its entries wait for the draw (or none will).
    sqlx::query!(
        "UPDATE event_queues SET draw_pending = $2 WHERE event_id = $1 AND draw_pending <> $2",
        id,
        edited.prequeue_opens_at.is_some()
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
    Ok(Json(EventDetail::of(&state.db, event, true, None).await?))
}

/// `409 presale_started`: once an event's pre-sale queue has opened, its times (and so its
/// draw) are fixed.
fn presale_unchanged(current: &Event, edited: &NewEvent, now: DateTime<Utc>) -> Result<(), ApiError> {
    let changed = current.sales_start != edited.sales_start || current.prequeue_opens_at != edited.prequeue_opens_at;
    match current.prequeue_opens_at {
        Some(opened) if changed && opened <= now => Err(ApiError::conflict(
            "presale_started",
            format!(
                "the pre-sale queue opened at {}; sales_start and prequeue_opens_at can no longer change",
                opened.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        )),
        _ => Ok(()),
    }
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
#[utoipa::path(delete, path = "/events/{id}", tag = "events",
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
            queue_demand_factor: None,
            sales_start: None,
            prequeue_opens_at: None,
        }
    }

    #[test]
    fn a_pre_sale_queue_opens_before_sales_start_which_comes_before_the_event() {
        let now = Utc::now();
        let hours = |h| Some(now + chrono::Duration::hours(h));
        let with = |start, opens| CreateEventRequest {
            sales_start: Some(start),
            prequeue_opens_at: Some(opens),
            ..request("1", 5)
        };
        assert!(with(hours(2), hours(1)).validate(now).is_ok());
        assert!(with(hours(2), None).validate(now).is_ok(), "a sales_start without a pre-sale");
        assert!(with(None, hours(1)).validate(now).is_err(), "a pre-sale needs a sales_start");
        assert!(with(hours(2), hours(2)).validate(now).is_err(), "the queue opens before the sale");
        assert!(with(hours(48), None).validate(now).is_err(), "the sale opens before the event (in 24 h)");
    }

    #[test]
    fn a_queue_demand_factor_is_1_to_10000_or_the_deployments() {
        let now = Utc::now();
        let with = |factor| CreateEventRequest { queue_demand_factor: Some(factor), ..request("1", 5) };
        assert_eq!(with(Some(1.5)).validate(now).ok().and_then(|e| e.queue_demand_factor), Some(1.5));
        assert_eq!(with(None).validate(now).ok().map(|e| e.queue_demand_factor), Some(None));
        for refused in [0.0, 0.99, 10_000.5, f64::NAN] {
            assert!(with(Some(refused)).validate(now).is_err(), "{refused}");
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
