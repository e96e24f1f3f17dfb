//! A user's webhook endpoints: where the worker delivers every status change of the user's
//! orders, signed per Standard Webhooks with the endpoint's own secret (shown once, at
//! registration), and the log of those deliveries.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use common::domain::{DeliveryStatus, text};
use common::webhook_targets::{TargetError, TargetPolicy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody, ResultExt};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(delete_endpoint))
        .routes(routes!(list_deliveries))
}

/// Most endpoints one user may register.
const MAX_ENDPOINTS_PER_USER: i64 = 10;
const MAX_DESCRIPTION_CHARS: usize = 500;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpointRequest {
    /// `http(s)` URL on the public internet, at most 2000 characters.
    #[schema(example = "https://example.com/turnstile-webhooks")]
    pub url: String,
    /// At most 500 characters.
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub description: String,
    /// `false` once the endpoint answered 410 Gone; nothing more is delivered to it.
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A new endpoint, with its signing secret: the only time it is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedEndpoint {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// `whsec_<base64>`: verify deliveries with it (Standard Webhooks). Shown only now.
    pub secret: String,
}

/// Register an endpoint for the caller's order events.
///
/// Every status change of the caller's orders (`order.queued`, `order.pending` (a
/// waiting-list offer too, with `reason` `WAITLIST_OFFER`), `order.paid`, `order.rejected`,
/// `order.expired`, `order.cancelled`, `order.refunded`) is `POST`ed to it as
/// JSON `{type, version, id, timestamp, data}`, with headers `webhook-id` (the same on every
/// retry of one delivery), `webhook-timestamp` and `webhook-signature`. Answer 2xx to
/// acknowledge; other answers and timeouts (10 s) are retried with exponential back-off;
/// 410 Gone disables the endpoint. Deliveries are not ordered: use `timestamp`.
#[utoipa::path(post, path = "/webhook-endpoints", tag = "webhooks", request_body = CreateEndpointRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered; the secret is in this answer only", body = CreatedEndpoint,
            headers(("Location" = String, description = "URL of the endpoint's deliveries"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 409, description = "The caller has an endpoint with this URL already (`endpoint_exists`)",
            body = ErrorBody),
        (status = 422, description = "Bad URL (`invalid_url`), a private or loopback target (`url_not_allowed`), \
            description too long (`invalid_description`), or 10 endpoints already (`too_many_endpoints`)", body = ErrorBody),
    ))]
pub async fn create_endpoint(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<CreateEndpointRequest>,
) -> Result<(StatusCode, HeaderMap, Json<CreatedEndpoint>), ApiError> {
    let description = req.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::invalid(
            "invalid_description",
            format!("description must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    if text::has_control_characters(&description, true) {
        return Err(ApiError::invalid("invalid_description", format!("description {}", text::CONTROL_CHARACTERS)));
    }
    let policy = TargetPolicy::new(state.config.webhook_targets.allow_networks.clone());
    let url = policy.check(req.url.trim()).await.map_err(|err| match err {
        TargetError::NotAllowed => ApiError::invalid("url_not_allowed", err.to_string()),
        _ => ApiError::invalid("invalid_url", err.to_string()),
    })?;
    let mut tx = state.db.begin().await?;
    // Count-then-insert under the account's lock: the limit holds exactly.
    super::accounts::lock_account(&mut tx, user.id).await?;
    let count: i64 =
        sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM webhook_endpoints WHERE user_id = $1"#, user.id)
            .fetch_one(&mut *tx)
            .await?;
    if count >= MAX_ENDPOINTS_PER_USER {
        return Err(ApiError::invalid(
            "too_many_endpoints",
            format!("at most {MAX_ENDPOINTS_PER_USER} endpoints per user; delete one first"),
        ));
    }
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()));
    let endpoint = sqlx::query_as!(
        Endpoint,
        "INSERT INTO webhook_endpoints (id, user_id, url, description, secret) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, url, description, enabled, disabled_reason, created_at",
        Uuid::now_v7(),
        user.id,
        url.as_str(),
        &description,
        &secret
    )
    .fetch_one(&mut *tx)
    .await
    .on_constraint("webhook_endpoints_user_url_key", || {
        ApiError::conflict("endpoint_exists", "you have an endpoint with this URL already")
    })?;
    tx.commit().await?;
    let headers = super::location(&format!("/api/v1/webhook-endpoints/{}/deliveries", endpoint.id));
    Ok((StatusCode::CREATED, headers, Json(CreatedEndpoint { endpoint, secret })))
}

/// The caller's endpoints, newest first (secrets are never shown again).
#[utoipa::path(get, path = "/webhook-endpoints", tag = "webhooks", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the caller's endpoints", body = [Endpoint],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ))]
pub async fn list_endpoints(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Endpoint>>), ApiError> {
    let limit = query.limit()?;
    let mut rows = sqlx::query_as!(
        Endpoint,
        "SELECT id, url, description, enabled, disabled_reason, created_at FROM webhook_endpoints
         WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        user.id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/webhook-endpoints", &mut rows, |row| row.id);
    Ok((headers, Json(rows)))
}

/// Delete one of the caller's endpoints; its pending deliveries are dropped.
#[utoipa::path(delete, path = "/webhook-endpoints/{id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Endpoint id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such endpoint, or not the caller's", body = ErrorBody),
    ))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let deleted = sqlx::query!("DELETE FROM webhook_endpoints WHERE id = $1 AND user_id = $2", id, user.id)
        .execute(&state.db)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("webhook endpoint"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// One attempt at a delivery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status; `null` when none came (timeout, connection refused).
    pub status_code: Option<i16>,
    pub latency_ms: i32,
    /// Why no answer came, when none did.
    pub error: Option<String>,
}

/// One event sent (or being sent) to the endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// The `webhook-id` header of every attempt.
    pub id: Uuid,
    /// e.g. `order.paid`.
    pub event_type: String,
    pub order_id: Uuid,
    /// `PENDING` (will be tried again at `next_attempt_at`), `SUCCEEDED`, `FAILED` (retries
    /// exhausted) or `ABANDONED` (endpoint disabled).
    pub status: DeliveryStatus,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Every attempt so far, oldest first.
    #[schema(value_type = Vec<Attempt>)]
    pub attempts: sqlx::types::Json<Vec<Attempt>>,
}

/// The deliveries to one of the caller's endpoints, newest first, with their attempts.
#[utoipa::path(get, path = "/webhook-endpoints/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path, description = "Endpoint id"), PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of deliveries", body = [Delivery],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such endpoint, or not the caller's", body = ErrorBody),
    ))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<Uuid>,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Delivery>>), ApiError> {
    let limit = query.limit()?;
    let owned: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1 AND user_id = $2) AS "exists!""#,
        id,
        user.id
    )
    .fetch_one(&state.db)
    .await?;
    if !owned {
        return Err(ApiError::NotFound("webhook endpoint"));
    }
    let mut rows = sqlx::query_as!(
        Delivery,
        r#"SELECT d.id, d.event_type, d.order_id, d.status AS "status: DeliveryStatus", d.next_attempt_at, d.created_at,
                  coalesce((SELECT json_agg(json_build_object('attempted_at', a.attempted_at, 'status_code', a.status_code,
                                                              'latency_ms', a.latency_ms, 'error', a.error) ORDER BY a.id)
                            FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]')
                      AS "attempts!: sqlx::types::Json<Vec<Attempt>>"
           FROM webhook_deliveries d
           WHERE d.endpoint_id = $1 AND ($2::uuid IS NULL OR d.id < $2)
           ORDER BY d.id DESC LIMIT $3"#,
        id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish(&format!("/api/v1/webhook-endpoints/{id}/deliveries"), &mut rows, |row| row.id);
    Ok((headers, Json(rows)))
}
