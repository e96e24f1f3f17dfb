//! The payment provider's side: its signed webhook that settles an order (`PAID`,
//! `REJECTED` or, later, `REFUNDED`), admins' refunds and the list of refunds for the
//! provider to execute, and the operators' list of late payments to refund.
//!
//! The webhook is verified per Standard Webhooks before anything else is looked at, and is
//! processed effectively once: its `webhook-id` is claimed in the same transaction that
//! applies it, so a retried or concurrent duplicate waits for the first, changes nothing,
//! and gets the answer the first one got.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use common::domain::{OrderStatus, OrderTrigger, Transition, reason, text};
use common::sales::changes::{self, OrderRow, RefundSource};
use common::standard_webhooks::{self, Headers};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(payment_webhook))
        .routes(routes!(list_late_payments))
        .routes(routes!(mark_refunded))
        .routes(routes!(refund_order))
        .routes(routes!(list_refunds))
}

/// The longest `reason` a provider may give for a declined payment.
const MAX_REASON_CHARS: usize = 200;

/// What the payment provider reports.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PaymentStatusRequest {
    pub status: PaymentOutcome,
    /// Why the payment was declined (with `REJECTED`; at most 200 characters). Defaults to
    /// `PAYMENT_DECLINED`.
    pub reason: Option<String>,
    /// The order this payment is for. The signature covers the body but not the URL, so a
    /// provider that includes it here binds the signature to the order; when present it
    /// must match the path.
    pub order_id: Option<Uuid>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentOutcome {
    Paid,
    Rejected,
    /// The provider returned a paid order's money.
    Refunded,
}

impl PaymentOutcome {
    fn trigger(self) -> OrderTrigger {
        match self {
            Self::Paid => OrderTrigger::PaymentSucceeded,
            Self::Rejected => OrderTrigger::PaymentFailed,
            Self::Refunded => OrderTrigger::Refunded,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "PAID",
            Self::Rejected => "REJECTED",
            Self::Refunded => "REFUNDED",
        }
    }
}

/// Payment result from the payment provider, signed per Standard Webhooks.
///
/// Headers: `webhook-id` (unique per message, kept across the provider's retries),
/// `webhook-timestamp` (Unix seconds, within 5 minutes of the server's clock) and
/// `webhook-signature`: space-separated `v1,<base64>` signatures, where each is the
/// HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{raw body}` under the key of
/// `WEBHOOK_SECRET`; one valid signature is enough (key rotation).
///
/// `PAID` moves a `PENDING` order to `PAID`; `REJECTED` moves it to `REJECTED` and releases
/// its tickets; `REFUNDED` moves a `PAID` order to `REFUNDED`, cancels its tickets (checked
/// in or not) and releases them to the waiting list or the sale, and records the refund as
/// executed (one an admin asked for is marked executed). The same change again answers 204. A change the order's status does not
/// allow answers 409 with `current_status`; a payment for an order that no longer holds
/// tickets (hold expired, cancelled, rejected) is also recorded as a late payment for
/// refund. A `webhook-id` already processed gets the first answer again and changes nothing.
#[utoipa::path(post, path = "/orders/{id}/status", tag = "payments", request_body = PaymentStatusRequest,
    params(
        ("id" = Uuid, Path, description = "Order id"),
        ("webhook-id" = String, Header, description = "Message id, 1 to 255 characters"),
        ("webhook-timestamp" = i64, Header, description = "Unix seconds"),
        ("webhook-signature" = String, Header, description = "`v1,<base64>`, space-separated"),
    ),
    responses(
        (status = 204, description = "Applied, or the order already had that status"),
        (status = 400, description = "Malformed JSON (`malformed_json`)", body = ErrorBody),
        (status = 401, description = "Missing, stale or invalid signature", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order's status does not allow it (`invalid_transition`, with `current_status`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Unknown status or bad reason (`invalid_body`), `order_id` not the path's \
            (`order_mismatch`), or `webhook-id` already used for another order (`webhook_id_reused`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing was applied, retry", body = ErrorBody),
    ))]
pub async fn payment_webhook(
    State(state): State<AppState>,
    Path(path_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest { code: "bad_request", message: rejection.body_text() },
    })?;
    let verified = state
        .webhook_key
        .verify(webhook_headers(&headers), &body, Utc::now().timestamp())
        .map_err(|err| ApiError::Unauthorized(err.message()))?;
    let order_id: Uuid = path_id.parse().map_err(|_| ApiError::NotFound("order"))?;
    let request = parse_request(&body, order_id)?;

    let mut tx = state.db.begin().await?;
    if !claim(&mut tx, verified.id, order_id).await? {
        drop(tx);
        return replay(&state, verified.id, order_id).await;
    }
    let mut locked = changes::lock(&mut tx, order_id, None).await?.ok_or(ApiError::NotFound("order"))?;
    let trigger = request.status.trigger();
    let offer_ttl = state.config.waitlist.offer_ttl();
    let transition = match request.status {
        PaymentOutcome::Paid => changes::apply(&mut locked, trigger, None, offer_ttl).await?,
        PaymentOutcome::Rejected => {
            let reason = Some(request.reason.as_deref().unwrap_or(reason::PAYMENT_DECLINED));
            changes::apply(&mut locked, trigger, reason, offer_ttl).await?
        }
        PaymentOutcome::Refunded => changes::refund(&mut locked, RefundSource::Provider, None, offer_ttl).await?,
    };
    let order = &locked.order;
    let (status, response) = match transition {
        Transition::Moves { .. } | Transition::AlreadyThere => (StatusCode::NO_CONTENT, None),
        Transition::Impossible => {
            if trigger == OrderTrigger::PaymentSucceeded && order.status.is_final() {
                record_late_payment(locked.lock.conn(), &locked.order, verified.id).await?;
            }
            let current = locked.order.status;
            let (status, body) = ApiError::InvalidTransition { current, target: request.status.as_str() }.to_body();
            (status, Some(serde_json::to_value(body).map_err(anyhow::Error::from)?))
        }
    };
    let final_status = locked.order.status;
    sqlx::query!(
        "UPDATE payment_webhooks SET status_code = $2, response = $3 WHERE webhook_id = $1",
        verified.id,
        i16::try_from(status.as_u16()).unwrap_or(i16::MAX),
        response
    )
    .execute(locked.lock.conn())
    .await?;
    tx.commit().await?;
    tracing::info!(%order_id, webhook_id = verified.id, requested = request.status.as_str(),
        status = final_status.as_str(), code = status.as_u16(), "payment webhook applied");
    Ok(respond(status, response))
}

fn webhook_headers(headers: &HeaderMap) -> Headers<'_> {
    let text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    Headers {
        id: text(standard_webhooks::HEADER_ID),
        timestamp: text(standard_webhooks::HEADER_TIMESTAMP),
        signature: text(standard_webhooks::HEADER_SIGNATURE),
    }
}

/// The body, checked: 400 when it is not JSON, 422 when it breaks a rule.
fn parse_request(body: &[u8], order_id: Uuid) -> Result<PaymentStatusRequest, ApiError> {
    let request: PaymentStatusRequest = crate::extract::from_json(body)?;
    if request.order_id.is_some_and(|id| id != order_id) {
        return Err(ApiError::invalid("order_mismatch", "order_id in the body is not the order of the URL"));
    }
    if let Some(reason) = &request.reason {
        if reason.trim().is_empty() || reason.chars().count() > MAX_REASON_CHARS {
            return Err(ApiError::invalid(
                "invalid_body",
                format!("reason must be 1 to {MAX_REASON_CHARS} characters"),
            ));
        }
        if text::has_control_characters(reason, false) {
            return Err(ApiError::invalid("invalid_body", format!("reason {}", text::CONTROL_CHARACTERS)));
        }
    }
    Ok(request)
}

/// Claims the webhook id for this transaction. A concurrent duplicate blocks here until the
/// first commits (then finds the id taken) or rolls back (then claims it itself).
async fn claim(tx: &mut PgConnection, webhook_id: &str, order_id: Uuid) -> Result<bool, ApiError> {
    let claimed = sqlx::query!(
        "INSERT INTO payment_webhooks (webhook_id, order_id, status_code) VALUES ($1, $2, 0)
         ON CONFLICT (webhook_id) DO NOTHING",
        webhook_id,
        order_id
    )
    .execute(&mut *tx)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// The answer given to the first delivery of this webhook id.
async fn replay(state: &AppState, webhook_id: &str, order_id: Uuid) -> Result<Response, ApiError> {
    let first = sqlx::query!(
        r#"SELECT order_id, status_code AS "status_code!", response FROM payment_webhooks WHERE webhook_id = $1"#,
        webhook_id
    )
    .fetch_one(&state.db)
    .await?;
    let (first_order, status, response) = (first.order_id, first.status_code, first.response);
    if first_order != order_id {
        return Err(ApiError::invalid("webhook_id_reused", "this webhook-id was already used for another order"));
    }
    let status =
        u16::try_from(status).ok().and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::NO_CONTENT);
    tracing::info!(%order_id, webhook_id, code = status.as_u16(), "payment webhook replayed");
    Ok(respond(status, response))
}

fn respond(status: StatusCode, body: Option<serde_json::Value>) -> Response {
    match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    }
}

async fn record_late_payment(tx: &mut PgConnection, order: &OrderRow, webhook_id: &str) -> Result<(), ApiError> {
    sqlx::query!(
        "INSERT INTO late_payments (id, order_id, webhook_id, order_status, amount) VALUES ($1, $2, $3, $4, $5)",
        Uuid::now_v7(),
        order.id,
        webhook_id,
        order.status.as_str(),
        order.total
    )
    .execute(&mut *tx)
    .await?;
    tracing::warn!(order_id = %order.id, webhook_id, status = order.status.as_str(), amount = %order.total,
        "payment for an order without a hold: recorded for refund");
    Ok(())
}

/// A payment confirmed for an order that no longer held tickets: to be refunded.
#[derive(Debug, Serialize, ToSchema)]
pub struct LatePayment {
    pub id: Uuid,
    pub order_id: Uuid,
    /// The payment provider's `webhook-id`, to find the payment on its side.
    pub webhook_id: String,
    /// The order's status when the payment arrived: `EXPIRED`, `CANCELLED` or `REJECTED`.
    pub order_status: OrderStatus,
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub amount: Decimal,
    /// ISO 4217 code of `amount` (the order's currency).
    #[schema(example = "EUR")]
    pub currency: String,
    pub received_at: DateTime<Utc>,
    /// When an operator marked it refunded; `null` while the money is still owed.
    pub refunded_at: Option<DateTime<Utc>>,
}

/// Late payments, newest first (admin): payments for orders that no longer held tickets.
#[utoipa::path(get, path = "/late-payments", tag = "payments", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of late payments", body = [LatePayment],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn list_late_payments(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<LatePayment>>), ApiError> {
    let limit = query.limit()?;
    let mut rows = sqlx::query_as!(
        LatePayment,
        r#"SELECT l.id, l.order_id, l.webhook_id, l.order_status AS "order_status: OrderStatus", l.amount,
                  o.currency, l.received_at, l.refunded_at
           FROM late_payments l JOIN orders o ON o.id = l.order_id
           WHERE ($1::uuid IS NULL OR l.id < $1) ORDER BY l.id DESC LIMIT $2"#,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/late-payments", &mut rows, |row| row.id);
    Ok((headers, Json(rows)))
}

/// Marks a late payment refunded (admin). Refunding happens at the payment provider; this
/// records that it was done. Repeating it keeps the first time.
#[utoipa::path(post, path = "/late-payments/{id}/refund", tag = "payments", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Late payment id")),
    responses(
        (status = 200, description = "The late payment, with `refunded_at`", body = LatePayment),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such late payment", body = ErrorBody),
    ))]
pub async fn mark_refunded(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
) -> Result<Json<LatePayment>, ApiError> {
    let row = sqlx::query_as!(
        LatePayment,
        r#"UPDATE late_payments l SET refunded_at = coalesce(refunded_at, now()) FROM orders o
           WHERE l.id = $1 AND o.id = l.order_id
           RETURNING l.id, l.order_id, l.webhook_id, l.order_status AS "order_status: OrderStatus", l.amount,
                     o.currency, l.received_at, l.refunded_at"#,
        id
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or(ApiError::NotFound("late payment"))?;
    Ok(Json(row))
}

/// A paid order's refund: recorded when the order became `REFUNDED`, once per order.
#[derive(Debug, Serialize, ToSchema)]
pub struct Refund {
    pub order_id: Uuid,
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub amount: Decimal,
    /// ISO 4217 code of `amount`.
    #[schema(example = "EUR")]
    pub currency: String,
    /// `PROVIDER` (the payment provider reported it), `ADMIN` (`POST /orders/{id}/refund`)
    /// or `EVENT_DELETED` (`DELETE /events/{id}?refund=true`).
    pub source: RefundSource,
    /// The admin who asked for it, when one did.
    pub requested_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// When the payment provider reported the money returned; `null` while it is still to
    /// be executed.
    pub executed_at: Option<DateTime<Utc>>,
}

/// Refund a paid order (admin): it becomes `REFUNDED`, its tickets are cancelled (a ticket
/// already checked in too: its check-in time stays on record, and scanning it again answers
/// that it is cancelled) and released to the event's waiting list or back on sale, and the
/// refund is recorded for the payment provider to execute (`GET /refunds?pending=true`; the
/// provider's `REFUNDED` webhook marks it executed). Asking again answers the same refund.
#[utoipa::path(post, path = "/orders/{id}/refund", tag = "payments", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, description = "The refund (also when the order was refunded already)", body = Refund),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order is not paid (`invalid_transition`, with `current_status`)", body = ErrorBody),
    ))]
pub async fn refund_order(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(order_id): Path<Uuid>,
) -> Result<Json<Refund>, ApiError> {
    let mut tx = state.db.begin().await?;
    let mut locked = changes::lock(&mut tx, order_id, None).await?.ok_or(ApiError::NotFound("order"))?;
    let offer_ttl = state.config.waitlist.offer_ttl();
    let transition = changes::refund(&mut locked, RefundSource::Admin, Some(admin.id), offer_ttl).await?;
    if transition == Transition::Impossible {
        return Err(ApiError::InvalidTransition { current: locked.order.status, target: "REFUNDED" });
    }
    drop(locked);
    let refund = sqlx::query_as!(
        Refund,
        r#"SELECT order_id, amount, currency, source AS "source: RefundSource", requested_by, created_at, executed_at
           FROM refunds WHERE order_id = $1"#,
        order_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::conflict("refunded_elsewhere", "the order was refunded before refunds were recorded"))?;
    tx.commit().await?;
    if matches!(transition, Transition::Moves { .. }) {
        tracing::info!(%order_id, admin_id = %admin.id, amount = %refund.amount, "order refunded by an admin");
    }
    Ok(Json(refund))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RefundsQuery {
    /// `true`: only refunds the payment provider has not reported executed yet.
    pub pending: Option<bool>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Cursor of the next page (`X-Next-Cursor`).
    pub cursor: Option<Uuid>,
}

/// Refunds, newest order first (admin); with `pending=true`, those the payment provider
/// still has to execute.
#[utoipa::path(get, path = "/refunds", tag = "payments", params(RefundsQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of refunds", body = [Refund],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn list_refunds(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<RefundsQuery>,
) -> Result<(HeaderMap, Json<Vec<Refund>>), ApiError> {
    let page = PageQuery { limit: query.limit, cursor: query.cursor };
    let limit = page.limit()?;
    let pending = query.pending.unwrap_or(false);
    let mut rows = sqlx::query_as!(
        Refund,
        r#"SELECT order_id, amount, currency, source AS "source: RefundSource", requested_by, created_at, executed_at
           FROM refunds
           WHERE ($1::uuid IS NULL OR order_id < $1) AND (NOT $2 OR executed_at IS NULL)
           ORDER BY order_id DESC LIMIT $3"#,
        page.cursor,
        pending,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let path = if pending { "/api/v1/refunds?pending=true" } else { "/api/v1/refunds" };
    let headers = page.finish(path, &mut rows, |row| row.order_id);
    Ok((headers, Json(rows)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_is_json_but_breaks_a_rule_is_422() {
        let order = Uuid::now_v7();
        for body in
            [r#"{"status": null}"#, r#"{"status": "SHIPPED"}"#, r#"{}"#, r#"{"status": "PAID", "reason": 5}"#, "[]"]
        {
            let err = parse_request(body.as_bytes(), order).expect_err(body);
            assert_eq!(err.to_body().0, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        }
        for body in ["{", "not json", ""] {
            let err = parse_request(body.as_bytes(), order).expect_err(body);
            assert_eq!(err.to_body().0, StatusCode::BAD_REQUEST, "{body}: {err}");
        }
    }
}
