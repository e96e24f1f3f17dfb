//! Promo codes (admin): discounts and access codes per event. A code takes a percentage or
//! an amount off each ticket of the types it names (neither: an access code), within a
//! window, up to `max_uses` tickets over all orders and `max_uses_per_buyer` per buyer.
//!
//! Whether a code has uses left is decided by the worker, in arrival order, inside the batch
//! transaction that issues the tickets (`common::sales`): a code's uses are the tickets held
//! or paid under it (`uses`, kept with `sold`), so it can never be used more than its limit.
//! Codes are never deleted: a `DELETE` withdraws one (it stops applying to new orders;
//! orders placed with it keep their price and their uses).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Datelike, Utc};
use common::domain::Currency;
use common::domain::money::{self, AmountText};
use common::sales::EventLock;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::input::{MAX_CAPACITY, MAX_PRICE, invalid, merge_patch};
use super::page::PageQuery;
use super::ticket_types::find_event;
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody, ResultExt};
use crate::extract::{Json, Path, Query};
use crate::purchase::rules::promo_code_shape;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_promo_codes, create_promo_code)).routes(routes!(
        get_promo_code,
        update_promo_code,
        delete_promo_code
    ))
}

/// The most live (not withdrawn) codes an event may have: the api keeps them in memory with
/// the event.
pub const MAX_CODES: i64 = 1_000;
/// The most ticket types one code may name.
const MAX_CODE_TYPES: usize = 50;

#[derive(Debug, Serialize, ToSchema)]
pub struct PromoCode {
    pub id: Uuid,
    pub event_id: Uuid,
    /// As written at its creation; buyers may type it in any case.
    #[schema(example = "EARLYBIRD")]
    pub code: String,
    /// Percent taken off each ticket it applies to (rounded half-up to the currency's minor
    /// unit, per ticket); `null` with `amount_off` or for an access code.
    #[schema(value_type = Option<String>, example = "15.00")]
    #[serde(serialize_with = "money::serialize_option")]
    pub percent_off: Option<Decimal>,
    /// Amount taken off each ticket it applies to (never below zero), in `currency`.
    #[schema(value_type = Option<String>, example = "5.00")]
    #[serde(serialize_with = "money::serialize_option")]
    pub amount_off: Option<Decimal>,
    /// The event's currency.
    #[schema(example = "EUR")]
    pub currency: String,
    /// The ticket types it applies to; `null`: every type of the event.
    pub ticket_type_ids: Option<Vec<Uuid>>,
    /// Most tickets under it over all orders; `null`: no limit.
    pub max_uses: Option<i32>,
    /// Most tickets under it per buyer; `null`: no limit.
    pub max_uses_per_buyer: Option<i32>,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    /// Tickets held (`PENDING`) or paid under it now: an expired, cancelled, declined or
    /// refunded order gives its uses back.
    pub uses: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When it was withdrawn (`DELETE`); withdrawn codes apply to no new order.
    pub withdrawn_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoCodeRequest {
    /// 3 to 64 letters, digits, `-` and `_`; unique among the event's live codes whatever
    /// the case.
    #[schema(example = "EARLYBIRD", min_length = 3, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub code: String,
    /// 1 to 100, at most two decimal places (a string or a number, taken as written). Not
    /// with `amount_off`.
    #[schema(value_type = Option<String>, example = "15")]
    pub percent_off: Option<AmountText>,
    /// More than 0, in the event's currency. Not with `percent_off`.
    #[schema(value_type = Option<String>, example = "5.00")]
    pub amount_off: Option<AmountText>,
    /// Live ticket types of the event, 1 to 50, each once; omitted or `null`: every type.
    pub ticket_type_ids: Option<Vec<Uuid>>,
    /// 1 to 10,000,000 tickets over all orders; omitted or `null`: no limit.
    pub max_uses: Option<i64>,
    /// 1 to 10,000,000 tickets per buyer; omitted or `null`: no limit.
    pub max_uses_per_buyer: Option<i64>,
    pub valid_from: Option<DateTime<Utc>>,
    /// After `valid_from`.
    pub valid_until: Option<DateTime<Utc>>,
}

/// A [`PromoCodeRequest`] that passed every rule.
struct NewPromoCode {
    code: String,
    percent_off: Option<Decimal>,
    amount_off: Option<Decimal>,
    ticket_type_ids: Option<Vec<Uuid>>,
    max_uses: Option<i32>,
    max_uses_per_buyer: Option<i32>,
    valid_from: Option<DateTime<Utc>>,
    valid_until: Option<DateTime<Utc>>,
}

fn limit(field: &str, value: Option<i64>) -> Result<Option<i32>, ApiError> {
    match value {
        // In range of i32: MAX_CAPACITY is 10,000,000.
        Some(value) if (1..=MAX_CAPACITY).contains(&value) => Ok(Some(value as i32)),
        Some(_) => Err(invalid(format!("{field} must be between 1 and {MAX_CAPACITY}"))),
        None => Ok(None),
    }
}

impl PromoCodeRequest {
    /// The rules that need nothing but the request and the event's currency and live types.
    fn validate(self, currency: &Currency, live_types: &[Uuid]) -> Result<NewPromoCode, ApiError> {
        if !promo_code_shape(&self.code) {
            return Err(invalid("code must be 3 to 64 letters, digits, '-' and '_'"));
        }
        if self.percent_off.is_some() && self.amount_off.is_some() {
            return Err(invalid("give at most one of percent_off and amount_off"));
        }
        let percent_off = match &self.percent_off {
            Some(text) => {
                let percent = money::parse_exact(&text.0).map_err(|err| invalid(format!("percent_off {err}")))?;
                if percent < Decimal::ONE || percent > Decimal::ONE_HUNDRED {
                    return Err(invalid("percent_off must be between 1 and 100"));
                }
                Some(percent)
            }
            None => None,
        };
        let amount_off = match &self.amount_off {
            Some(text) => {
                let amount = money::parse_exact(&text.0).map_err(|err| invalid(format!("amount_off {err}")))?;
                if amount <= Decimal::ZERO || amount > MAX_PRICE {
                    return Err(invalid(format!("amount_off must be more than 0 and at most {MAX_PRICE}")));
                }
                currency.check(amount).map_err(|err| invalid(format!("amount_off {err} ({currency})")))?;
                Some(amount)
            }
            None => None,
        };
        if let Some(ids) = &self.ticket_type_ids {
            if ids.is_empty() || ids.len() > MAX_CODE_TYPES {
                return Err(invalid(format!(
                    "ticket_type_ids must name 1 to {MAX_CODE_TYPES} types (null: every type of the event)"
                )));
            }
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            if unique.len() != ids.len() {
                return Err(invalid("ticket_type_ids must name each type once"));
            }
            if let Some(unknown) = ids.iter().find(|id| !live_types.contains(id)) {
                return Err(ApiError::invalid(
                    "unknown_ticket_type",
                    format!("the event sells no ticket type {unknown}"),
                ));
            }
        }
        for (field, at) in [("valid_from", self.valid_from), ("valid_until", self.valid_until)] {
            if at.is_some_and(|at| at.year() > 9999) {
                return Err(invalid(format!("{field} must be before the year 10000")));
            }
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.valid_until)
            && from >= until
        {
            return Err(invalid("valid_until must be after valid_from"));
        }
        Ok(NewPromoCode {
            code: self.code,
            percent_off,
            amount_off,
            ticket_type_ids: self.ticket_type_ids,
            max_uses: limit("max_uses", self.max_uses)?,
            max_uses_per_buyer: limit("max_uses_per_buyer", self.max_uses_per_buyer)?,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
        })
    }
}

impl From<&PromoCode> for PromoCodeRequest {
    fn from(c: &PromoCode) -> Self {
        Self {
            code: c.code.clone(),
            percent_off: c.percent_off.map(AmountText::from),
            amount_off: c.amount_off.map(AmountText::from),
            ticket_type_ids: c.ticket_type_ids.clone(),
            max_uses: c.max_uses.map(i64::from),
            max_uses_per_buyer: c.max_uses_per_buyer.map(i64::from),
            valid_from: c.valid_from,
            valid_until: c.valid_until,
        }
    }
}

/// The event's codes, newest first: one (`only`), or a page after `cursor`.
async fn select<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    event_id: Uuid,
    only: Option<Uuid>,
    cursor: Option<Uuid>,
    limit: i64,
) -> Result<Vec<PromoCode>, ApiError> {
    Ok(sqlx::query_as!(
        PromoCode,
        r#"SELECT c.id, c.event_id, c.code, c.percent_off, c.amount_off, e.currency, c.ticket_type_ids,
                  c.max_uses, c.max_uses_per_buyer, c.valid_from, c.valid_until, c.uses, c.created_at, c.updated_at,
                  c.withdrawn_at
           FROM promo_codes c JOIN events e ON e.id = c.event_id
           WHERE c.event_id = $1 AND ($2::uuid IS NULL OR c.id = $2) AND ($3::uuid IS NULL OR c.id < $3)
           ORDER BY c.id DESC
           LIMIT $4"#,
        event_id,
        only,
        cursor,
        limit
    )
    .fetch_all(db)
    .await?)
}

/// One code of the event (withdrawn too if `include_withdrawn`), or 404.
async fn load<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    event_id: Uuid,
    code_id: Uuid,
    include_withdrawn: bool,
) -> Result<PromoCode, ApiError> {
    select(db, event_id, Some(code_id), None, 1)
        .await?
        .pop()
        .filter(|code| include_withdrawn || code.withdrawn_at.is_none())
        .ok_or(ApiError::NotFound("promo code"))
}

/// Locks the live event (the allocator's lock, as for ticket types: it orders a code's change
/// with the decisions that count its uses) and returns its currency and live ticket types.
async fn lock_event(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<(EventLock<'_>, Currency, Vec<Uuid>), ApiError> {
    let (mut lock, currency) = super::ticket_types::lock_event(tx, id).await?;
    let types = sqlx::query_scalar!("SELECT id FROM ticket_types WHERE event_id = $1 AND deleted_at IS NULL", id)
        .fetch_all(lock.conn())
        .await?;
    Ok((lock, currency, types))
}

fn code_taken() -> ApiError {
    ApiError::conflict("promo_code_exists", "the event already has a live promo code of this name (whatever its case)")
}

/// An event's promo codes (admin), newest first, withdrawn ones included, each with its
/// `uses`.
#[utoipa::path(get, path = "/events/{id}/promo-codes", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the event's promo codes", body = [PromoCode],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
    ))]
pub async fn list_promo_codes(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Path(id): Path<Uuid>,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<PromoCode>>), ApiError> {
    let limit = query.limit()?;
    find_event(&state.db, id, false).await?;
    let mut codes = select(&state.db, id, None, query.cursor, limit + 1).await?;
    let headers = query.finish(&format!("/api/v1/events/{id}/promo-codes"), &mut codes, |code| code.id);
    Ok((headers, Json(codes)))
}

/// One promo code of the event (admin), withdrawn or not.
#[utoipa::path(get, path = "/events/{id}/promo-codes/{code_id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), ("code_id" = Uuid, Path, description = "Promo code id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The promo code", body = PromoCode),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event or promo code", body = ErrorBody),
    ))]
pub async fn get_promo_code(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Path((id, code_id)): Path<(Uuid, Uuid)>,
) -> Result<Json<PromoCode>, ApiError> {
    find_event(&state.db, id, false).await?;
    load(&state.db, id, code_id, true).await.map(Json)
}

/// Create a promo code for an event (admin).
#[utoipa::path(post, path = "/events/{id}/promo-codes", tag = "events", request_body = PromoCodeRequest,
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    responses(
        (status = 201, description = "Promo code created", body = PromoCode,
            headers(("Location" = String, description = "URL of the new promo code"))),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 409, description = "A live code of this name exists (`promo_code_exists`), or the event has \
            the most live codes it may have (`too_many_promo_codes`)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`), names a type the event does \
            not sell (`unknown_ticket_type`), or is unknown (`invalid_body`)", body = ErrorBody),
    ))]
pub async fn create_promo_code(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    Json(req): Json<PromoCodeRequest>,
) -> Result<(StatusCode, HeaderMap, Json<PromoCode>), ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, currency, types) = lock_event(&mut tx, id).await?;
    let new = req.validate(&currency, &types)?;
    let live: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM promo_codes WHERE event_id = $1 AND withdrawn_at IS NULL"#,
        id
    )
    .fetch_one(lock.conn())
    .await?;
    if live >= MAX_CODES {
        return Err(ApiError::conflict(
            "too_many_promo_codes",
            format!("an event may have at most {MAX_CODES} live promo codes; withdraw one first"),
        ));
    }
    let code_id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO promo_codes (id, event_id, code, percent_off, amount_off, ticket_type_ids, max_uses,
                                  max_uses_per_buyer, valid_from, valid_until)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        code_id,
        id,
        &new.code,
        new.percent_off,
        new.amount_off,
        new.ticket_type_ids.as_deref(),
        new.max_uses,
        new.max_uses_per_buyer,
        new.valid_from,
        new.valid_until
    )
    .execute(lock.conn())
    .await
    .on_constraint("promo_codes_event_code", code_taken)?;
    let created = load(lock.conn(), id, code_id, false).await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, promo_code_id = %code_id, admin_id = %admin.id, "promo code created");
    let location = super::location(&format!("/api/v1/events/{id}/promo-codes/{code_id}"));
    Ok((StatusCode::CREATED, location, Json(created)))
}

/// Edit a live promo code (admin): any subset of the fields of `POST`; `null` clears the
/// discount, the types (every type), the limits or the window. Orders already placed keep
/// their price; `max_uses` never below the code's `uses` (409 `max_uses_below_uses`).
#[utoipa::path(patch, path = "/events/{id}/promo-codes/{code_id}", tag = "events", request_body = Object,
    params(("id" = Uuid, Path, description = "Event id"), ("code_id" = Uuid, Path, description = "Promo code id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The promo code as edited", body = PromoCode),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event or promo code (or withdrawn)", body = ErrorBody),
        (status = 409, description = "`max_uses` below the tickets held or paid under it (`max_uses_below_uses`), \
            or another live code has the new name (`promo_code_exists`)", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`validation_failed`, `unknown_ticket_type`) or is \
            unknown (`invalid_body`)", body = ErrorBody),
    ))]
pub async fn update_promo_code(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path((id, code_id)): Path<(Uuid, Uuid)>,
    Json(patch): Json<BTreeMap<String, Box<RawValue>>>,
) -> Result<Json<PromoCode>, ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, currency, types) = lock_event(&mut tx, id).await?;
    let current = load(lock.conn(), id, code_id, false).await?;
    let edited = merge_patch(&PromoCodeRequest::from(&current), &patch)?.validate(&currency, &types)?;
    if edited.max_uses.is_some_and(|max| max < current.uses) {
        return Err(ApiError::conflict(
            "max_uses_below_uses",
            format!("{} tickets are held or paid under this code; max_uses cannot go below that", current.uses),
        ));
    }
    sqlx::query!(
        "UPDATE promo_codes SET code = $2, percent_off = $3, amount_off = $4, ticket_type_ids = $5, max_uses = $6,
                max_uses_per_buyer = $7, valid_from = $8, valid_until = $9, updated_at = now()
         WHERE id = $1",
        code_id,
        &edited.code,
        edited.percent_off,
        edited.amount_off,
        edited.ticket_type_ids.as_deref(),
        edited.max_uses,
        edited.max_uses_per_buyer,
        edited.valid_from,
        edited.valid_until
    )
    .execute(lock.conn())
    .await
    .on_constraint("promo_codes_event_code", code_taken)?;
    let updated = load(lock.conn(), id, code_id, false).await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, promo_code_id = %code_id, admin_id = %admin.id,
        fields = ?patch.keys().collect::<Vec<_>>(), "promo code edited");
    Ok(Json(updated))
}

/// Withdraw a promo code (admin): it applies to no new order (`invalid_promo_code`); orders
/// placed with it, queued ones included, keep their price, and their uses until they end.
#[utoipa::path(delete, path = "/events/{id}/promo-codes/{code_id}", tag = "events",
    params(("id" = Uuid, Path, description = "Event id"), ("code_id" = Uuid, Path, description = "Promo code id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Withdrawn"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event or promo code (or already withdrawn)", body = ErrorBody),
    ))]
pub async fn delete_promo_code(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path((id, code_id)): Path<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.db.begin().await?;
    let (mut lock, _, _) = lock_event(&mut tx, id).await?;
    load(lock.conn(), id, code_id, false).await?;
    sqlx::query!("UPDATE promo_codes SET withdrawn_at = now(), updated_at = now() WHERE id = $1", code_id)
        .execute(lock.conn())
        .await?;
    tx.commit().await?;
    state.catalog.forget(id);
    tracing::info!(event_id = %id, promo_code_id = %code_id, admin_id = %admin.id, "promo code withdrawn");
    Ok(StatusCode::NO_CONTENT)
}
