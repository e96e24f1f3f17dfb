//! Ticket types: the tiers an event sells (General, VIP, Student …), each with its own
//! price, stock, limits and sale window, under the event's capacity (the venue cap).
//!
//! Every event has one from its creation, "General admission" (made by a trigger, see
//! migration 0012), which the seed's `{event_id, quantity}` orders buy. Types are never
//! deleted: a `DELETE` withdraws one from sale (`deleted_at`) once it holds no tickets.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike, Utc};
use common::domain::Currency;
use common::domain::money::AmountText;
use common::domain::text;
use common::sales::{self, EventLock};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::input::{MAX_CAPACITY, MAX_PER_ORDER, invalid, merge_patch, required_text, valid_price};
use crate::auth::{AdminUser, AuthUser};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_ticket_types, create_ticket_type)).routes(routes!(
        get_ticket_type,
        update_ticket_type,
        delete_ticket_type
    ))
}

/// The most ticket types an event may have on sale at once.
pub const MAX_TYPES: i64 = 50;
const MAX_SORT_ORDER: i64 = 1_000_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct TicketType {
    pub id: Uuid,
    pub event_id: Uuid,
    #[schema(example = "VIP")]
    pub name: String,
    pub description: String,
    #[schema(value_type = String, example = "199.00")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub price: Decimal,
    /// ISO 4217 code of `price`: the event's currency.
    #[schema(example = "EUR")]
    pub currency: String,
    /// Tickets of this type, at most; `null`: no stock of its own, only the event's
    /// capacity (the venue cap over all types) limits it.
    pub capacity: Option<i32>,
    /// Tickets of this type sold or held.
    pub sold: i32,
    /// What can still be bought: the type's stock left, at most what the venue has left.
    pub tickets_available: i32,
    /// Most tickets of this type in one order (`null`: the event's `max_per_order` only).
    pub max_per_order: Option<i32>,
    /// Most tickets of this type one buyer may hold over all their live orders.
    pub max_per_buyer: Option<i32>,
    /// Orders arriving before this time are refused (`not_on_sale`).
    pub sales_start: Option<DateTime<Utc>>,
    /// Orders arriving at or after this time are refused.
    pub sales_end: Option<DateTime<Utc>>,
    /// Left out of public listings; still sold to whoever has its id (a link you share).
    pub hidden: bool,
    /// Sold only on orders carrying a live promo code that names it (422
    /// `promo_code_required` otherwise); listed only to admins and to requests whose
    /// `?promo_code=` is such a code.
    pub requires_promo_code: bool,
    /// Listing order, lowest first.
    pub sort_order: i32,
    /// The type `{event_id, quantity}` orders buy.
    pub is_default: bool,
    /// In its sale window now, and not withdrawn.
    pub on_sale: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When an admin withdrew it; only admins see withdrawn types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketTypeRequest {
    #[schema(example = "VIP")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// 0 or more, at most 2 decimal places, in the event's currency; a string or a number
    /// taken exactly as written.
    #[schema(value_type = String, example = "199.00")]
    pub price: AmountText,
    /// Tickets of this type, 0 to 10,000,000; omitted or `null`: only the venue cap.
    pub capacity: Option<i64>,
    /// 1 to 1000; omitted or `null`: the event's `max_per_order` only.
    pub max_per_order: Option<i64>,
    /// At least 1; omitted or `null`: no cap per buyer for this type.
    pub max_per_buyer: Option<i64>,
    pub sales_start: Option<DateTime<Utc>>,
    /// After `sales_start`.
    pub sales_end: Option<DateTime<Utc>>,
    #[serde(default)]
    pub hidden: bool,
    /// Sold only with a promo code that names it (default false).
    #[serde(default)]
    pub requires_promo_code: bool,
    /// -1,000,000 to 1,000,000 (default 0).
    #[serde(default)]
    pub sort_order: i64,
}

/// A [`TicketTypeRequest`] that passed every rule.
struct NewTicketType {
    name: String,
    description: String,
    price: Decimal,
    capacity: Option<i32>,
    max_per_order: Option<i32>,
    max_per_buyer: Option<i32>,
    sales_start: Option<DateTime<Utc>>,
    sales_end: Option<DateTime<Utc>>,
    hidden: bool,
    requires_promo_code: bool,
    sort_order: i32,
}

fn bounded(field: &str, value: Option<i64>, min: i64, max: i64) -> Result<Option<i32>, ApiError> {
    match value {
        // In range of i32: max is at most 10,000,000.
        Some(value) if (min..=max).contains(&value) => Ok(Some(value as i32)),
        Some(_) => Err(invalid(format!("{field} must be between {min} and {max}"))),
        None => Ok(None),
    }
}

impl TicketTypeRequest {
    fn validate(self, currency: &Currency) -> Result<NewTicketType, ApiError> {
        let price = valid_price(&self.price, currency)?;
        for (field, at) in [("sales_start", self.sales_start), ("sales_end", self.sales_end)] {
            if at.is_some_and(|at| at.year() > 9999) {
                return Err(invalid(format!("{field} must be before the year 10000")));
            }
        }
        if let (Some(start), Some(end)) = (self.sales_start, self.sales_end)
            && start >= end
        {
            return Err(invalid("sales_end must be after sales_start"));
        }
        let description = self.description.trim();
        if description.chars().count() > 5000 {
            return Err(invalid("description must be at most 5000 characters"));
        }
        if text::has_control_characters(description, true) {
            return Err(invalid(format!("description {}", text::CONTROL_CHARACTERS)));
        }
        Ok(NewTicketType {
            name: required_text("name", &self.name, 200)?,
            description: description.to_owned(),
            price,
            capacity: bounded("capacity", self.capacity, 0, MAX_CAPACITY)?,
            max_per_order: bounded("max_per_order", self.max_per_order, 1, MAX_PER_ORDER)?,
            max_per_buyer: bounded("max_per_buyer", self.max_per_buyer, 1, MAX_CAPACITY)?,
            sales_start: self.sales_start,
            sales_end: self.sales_end,
            hidden: self.hidden,
            requires_promo_code: self.requires_promo_code,
            sort_order: bounded("sort_order", Some(self.sort_order), -MAX_SORT_ORDER, MAX_SORT_ORDER)?.unwrap_or(0),
        })
    }
}

impl From<&TicketType> for TicketTypeRequest {
    fn from(t: &TicketType) -> Self {
        Self {
            name: t.name.clone(),
            description: t.description.clone(),
            price: AmountText::from(t.price),
            capacity: t.capacity.map(i64::from),
            max_per_order: t.max_per_order.map(i64::from),
            max_per_buyer: t.max_per_buyer.map(i64::from),
            sales_start: t.sales_start,
            sales_end: t.sales_end,
            hidden: t.hidden,
            requires_promo_code: t.requires_promo_code,
            sort_order: i64::from(t.sort_order),
        }
    }
}

/// An event's ticket types, in `sort_order`. Hidden and withdrawn types only for admins;
/// types that require a promo code for admins, and for holders of a live code (`promo_code`)
/// that names them.
pub async fn types_of(
    db: &sqlx::PgPool,
    event_id: Uuid,
    admin: bool,
    promo_code: Option<&str>,
) -> Result<Vec<TicketType>, ApiError> {
    let shown = Shown { hidden: admin, withdrawn: admin, code_only: admin, code: promo_code };
    select(db, event_id, None, shown).await
}

/// `?promo_code=` of a listing: the code whose types that require one are shown.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CodeQuery {
    /// A promo code of the event: the types that require a code and that it names are
    /// listed too.
    pub promo_code: Option<String>,
}

/// Which ticket types a read returns besides those listed and on offer.
struct Shown<'a> {
    hidden: bool,
    withdrawn: bool,
    /// Every type that requires a promo code.
    code_only: bool,
    /// The types that require a promo code and that this live code names.
    code: Option<&'a str>,
}

/// The event's ticket types (`only`: that one, if it is the event's), in `sort_order`.
async fn select<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    event_id: Uuid,
    only: Option<Uuid>,
    shown: Shown<'_>,
) -> Result<Vec<TicketType>, ApiError> {
    Ok(sqlx::query_as!(
        TicketType,
        r#"SELECT t.id, t.event_id, t.name, t.description, t.price, e.currency, t.capacity, t.sold,
                  greatest(0, least(coalesce(t.capacity - t.sold, e.capacity - e.sold), e.capacity - e.sold))
                      AS "tickets_available!",
                  t.max_per_order, t.max_per_buyer, t.sales_start, t.sales_end, t.hidden, t.requires_promo_code,
                  t.sort_order,
                  t.id IS NOT DISTINCT FROM e.default_ticket_type_id AS "is_default!",
                  t.deleted_at IS NULL AND (t.sales_start IS NULL OR t.sales_start <= now())
                      AND (t.sales_end IS NULL OR now() < t.sales_end) AS "on_sale!",
                  t.created_at, t.updated_at, t.deleted_at
           FROM ticket_types t JOIN events e ON e.id = t.event_id
           WHERE t.event_id = $1 AND ($2::uuid IS NULL OR t.id = $2)
             AND (NOT t.hidden OR $3) AND (t.deleted_at IS NULL OR $4)
             AND (NOT t.requires_promo_code OR $5 OR EXISTS (
                     SELECT 1 FROM promo_codes c
                     WHERE c.event_id = t.event_id AND lower(c.code) = lower($6) AND c.withdrawn_at IS NULL
                       AND (c.ticket_type_ids IS NULL OR t.id = ANY(c.ticket_type_ids))
                       AND (c.valid_from IS NULL OR c.valid_from <= now())
                       AND (c.valid_until IS NULL OR now() < c.valid_until)))
           ORDER BY t.sort_order, t.id"#,
        event_id,
        only,
        shown.hidden,
        shown.withdrawn,
        shown.code_only,
        shown.code
    )
    .fetch_all(db)
    .await?)
}

/// The event (not deleted, or deleted for admins), or 404.
pub(super) async fn find_event(db: &sqlx::PgPool, id: Uuid, admin: bool) -> Result<(), ApiError> {
    sqlx::query!("SELECT 1 AS found FROM events WHERE id = $1 AND (deleted_at IS NULL OR $2)", id, admin)
        .fetch_optional(db)
        .await?
        .map(|_| ())
        .ok_or(ApiError::NotFound("event"))
}

/// An event's ticket types, with what is left of each, in `sort_order`. Hidden and
/// withdrawn types are listed to admins only; types that require a promo code to admins and
/// with `?promo_code=` a live code that names them.
#[utoipa::path(get, path = "/events/{id}/ticket-types", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), CodeQuery),
    responses(
        (status = 200, description = "The event's ticket types", body = [TicketType]),
        (status = 401, description = "A token was sent but is invalid", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn list_ticket_types(
    State(state): State<AppState>,
    user: Option<AuthUser>,
    Path(id): Path<Uuid>,
    Query(query): Query<CodeQuery>,
) -> Result<Json<Vec<TicketType>>, ApiError> {
    let admin = user.is_some_and(|user| user.is_admin());
    find_event(&state.db, id, admin).await?;
    Ok(Json(types_of(&state.db, id, admin, query.promo_code.as_deref()).await?))
}

/// One ticket type. A hidden one (or one that requires a promo code) is shown to whoever has
/// its id; a withdrawn one to admins.
#[utoipa::path(get, path = "/events/{id}/ticket-types/{type_id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), ("type_id" = Uuid, Path, description = "Ticket type id")),
    responses(
        (status = 200, description = "The ticket type", body = TicketType),
        (status = 401, description = "A token was sent but is invalid", body = ErrorBody),
        (status = 404, description = "No such event or ticket type", body = ErrorBody),
    ))]
pub async fn get_ticket_type(
    State(state): State<AppState>,
    user: Option<AuthUser>,
    Path((id, type_id)): Path<(Uuid, Uuid)>,
) -> Result<Json<TicketType>, ApiError> {
    let admin = user.is_some_and(|user| user.is_admin());
    find_event(&state.db, id, admin).await?;
    load(&state.db, id, type_id, admin).await.map(Json)
}

/// One ticket type of the event, hidden or not (withdrawn: if `include_withdrawn`), or 404.
async fn load<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    event_id: Uuid,
    type_id: Uuid,
    include_withdrawn: bool,
) -> Result<TicketType, ApiError> {
    let shown = Shown { hidden: true, withdrawn: include_withdrawn, code_only: true, code: None };
    select(db, event_id, Some(type_id), shown).await?.pop().ok_or(ApiError::NotFound("ticket type"))
}

/// Locks the live event (the allocator's lock: it orders this change with the decisions
/// and with other edits of its types) and returns its currency.
pub(super) async fn lock_event(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<(EventLock<'_>, Currency), ApiError> {
    let lock = sales::lock_live_event(tx, id).await?.ok_or(ApiError::NotFound("event"))?;
    let code = lock.event(id).map(|event| event.currency.as_str()).unwrap_or_default();
    let currency =
        Currency::parse(code).map_err(|err| ApiError::Internal(anyhow::anyhow!("stored currency {code}: {err}")))?;
    Ok((lock, currency))
}

/// Add a ticket type to an event (admin). The event's capacity stays the cap over all its
/// types: types' capacities may add up to more (whichever runs out first stops the sale).
#[utoipa::path(post, path = "/events/{id}/ticket-types", tag = "events", request_body = TicketTypeRequest,
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 201, description = "Ticket type created", body = TicketType,
            headers(("Location" = String, description = "URL of the new ticket type"))),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 409, description = "The event has the most types it may have on sale (`too_many_ticket_types`)",
            body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`)", body = ErrorBody),
    ))]
pub async fn create_ticket_type(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    Json(req): Json<TicketTypeRequest>,
) -> Result<(StatusCode, HeaderMap, Json<TicketType>), ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, currency) = lock_event(&mut tx, id).await?;
    let new = req.validate(&currency)?;
    let live: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM ticket_types WHERE event_id = $1 AND deleted_at IS NULL"#,
        id
    )
    .fetch_one(lock.conn())
    .await?;
    if live >= MAX_TYPES {
        return Err(ApiError::conflict(
            "too_many_ticket_types",
            format!("an event may have at most {MAX_TYPES} ticket types on sale; withdraw one first"),
        ));
    }
    let type_id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO ticket_types (id, event_id, name, description, price, capacity, max_per_order, max_per_buyer,
                                   sales_start, sales_end, hidden, sort_order, requires_promo_code)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        type_id,
        id,
        &new.name,
        &new.description,
        new.price,
        new.capacity,
        new.max_per_order,
        new.max_per_buyer,
        new.sales_start,
        new.sales_end,
        new.hidden,
        new.sort_order,
        new.requires_promo_code
    )
    .execute(lock.conn())
    .await?;
    let created = load(lock.conn(), id, type_id, false).await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, ticket_type_id = %type_id, admin_id = %admin.id, "ticket type created");
    let location = super::location(&format!("/api/v1/events/{id}/ticket-types/{type_id}"));
    Ok((StatusCode::CREATED, location, Json(created)))
}

/// Edit a ticket type (admin): any subset of the fields of `POST`; `null` clears
/// `capacity`, the limits or the sale window. `capacity` never below the type's tickets sold
/// or held (409 `capacity_below_sold`). A price change applies to new orders only; the
/// default type's price is the event's `price`, so changing one changes the other.
#[utoipa::path(patch, path = "/events/{id}/ticket-types/{type_id}", tag = "events", request_body = Object,
    params(("id" = Uuid, Path, description = "Event id"), ("type_id" = Uuid, Path, description = "Ticket type id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The ticket type as edited", body = TicketType),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event or ticket type (or withdrawn)", body = ErrorBody),
        (status = 409, description = "Capacity below the tickets sold or held (`capacity_below_sold`)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`) or is unknown (`invalid_body`)",
            body = ErrorBody),
    ))]
pub async fn update_ticket_type(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path((id, type_id)): Path<(Uuid, Uuid)>,
    Json(patch): Json<BTreeMap<String, Box<RawValue>>>,
) -> Result<Json<TicketType>, ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, currency) = lock_event(&mut tx, id).await?;
    let current = load(lock.conn(), id, type_id, false).await?;
    let request = merge_patch(&TicketTypeRequest::from(&current), &patch)?;
    let edited = request.validate(&currency)?;
    if edited.capacity.is_some_and(|capacity| capacity < current.sold) {
        return Err(ApiError::conflict(
            "capacity_below_sold",
            format!("{} tickets of this type are sold or held; capacity cannot go below that", current.sold),
        ));
    }
    sqlx::query!(
        "UPDATE ticket_types SET name = $2, description = $3, price = $4, capacity = $5, max_per_order = $6,
                max_per_buyer = $7, sales_start = $8, sales_end = $9, hidden = $10, sort_order = $11,
                requires_promo_code = $12, updated_at = now()
         WHERE id = $1",
        type_id,
        &edited.name,
        &edited.description,
        edited.price,
        edited.capacity,
        edited.max_per_order,
        edited.max_per_buyer,
        edited.sales_start,
        edited.sales_end,
        edited.hidden,
        edited.sort_order,
        edited.requires_promo_code
    )
    .execute(lock.conn())
    .await?;
    // Capacity raised (or a window or cap changed): the waiting list is offered what it can
    // take first.
    sales::waitlist::offer(&mut lock, id, state.config.waitlist.offer_ttl()).await?;
    let updated = load(lock.conn(), id, type_id, false).await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, ticket_type_id = %type_id, admin_id = %admin.id,
        fields = ?patch.keys().collect::<Vec<_>>(), "ticket type edited");
    Ok(Json(updated))
}

/// Withdraw a ticket type from sale (admin), once it holds no tickets (409
/// `ticket_type_has_tickets`: edit `sales_end` or `capacity` to stop selling a type that
/// has). Orders for it still queued are refused (`NOT_ON_SALE`). If it was the default type,
/// the event has none after it: `{event_id, quantity}` orders are refused
/// (`ticket_type_required`) and buyers name types in `items`.
#[utoipa::path(delete, path = "/events/{id}/ticket-types/{type_id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), ("type_id" = Uuid, Path, description = "Ticket type id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Withdrawn"),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event or ticket type (or already withdrawn)", body = ErrorBody),
        (status = 409, description = "Tickets of the type are sold or held (`ticket_type_has_tickets`)",
            body = ErrorBody),
    ))]
pub async fn delete_ticket_type(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path((id, type_id)): Path<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, _) = lock_event(&mut tx, id).await?;
    let current = load(lock.conn(), id, type_id, false).await?;
    if current.sold > 0 {
        return Err(ApiError::conflict(
            "ticket_type_has_tickets",
            format!("{} tickets of this type are sold or held; stop its sale with sales_end instead", current.sold),
        ));
    }
    sqlx::query!("UPDATE ticket_types SET deleted_at = now(), updated_at = now() WHERE id = $1", type_id)
        .execute(lock.conn())
        .await?;
    // Nobody waits for a type that is no longer sold (it holds no tickets, so no offers).
    sqlx::query!(
        "UPDATE waitlist_entries SET status = 'CLOSED', updated_at = now()
         WHERE ticket_type_id = $1 AND status = 'WAITING'",
        type_id
    )
    .execute(lock.conn())
    .await?;
    sqlx::query!(
        "UPDATE events SET default_ticket_type_id = NULL, updated_at = now()
         WHERE id = $1 AND default_ticket_type_id = $2",
        id,
        type_id
    )
    .execute(lock.conn())
    .await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, ticket_type_id = %type_id, admin_id = %admin.id, "ticket type withdrawn");
    Ok(StatusCode::NO_CONTENT)
}
