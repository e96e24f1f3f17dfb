//! The caller's own account, the events they created and the events they hold tickets for.

use axum::extract::State;
use common::domain::{Password, Role, UserName};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::accounts::{ChangedUser, UserResponse, parse_email, throttled};
use super::events::{Event, events_by_id, page_of_events};
use super::page::PageQuery;
use crate::auth::{AuthUser, hash_password, verify_password};
use crate::error::{ApiError, ErrorBody, ResultExt};
use crate::extract::{Json, Query};
use crate::state::AppState;
use axum::http::HeaderMap;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(me, update_me)).routes(routes!(my_events)).routes(routes!(my_tickets))
}

/// The caller's account.
#[utoipa::path(get, path = "/me", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserResponse),
        (status = 401, description = "Missing, invalid or expired token, or the account is gone", body = ErrorBody),
    ))]
pub async fn me(State(state): State<AppState>, user: AuthUser) -> Result<Json<UserResponse>, ApiError> {
    sqlx::query_as!(
        UserResponse,
        r#"SELECT id, name, email, role AS "role: Role", created_at, deactivated_at FROM users WHERE id = $1"#,
        user.id
    )
    .fetch_optional(&state.db)
    .await?
    .map(Json)
    .ok_or(ApiError::ACCOUNT_GONE)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeRequest {
    /// New display name (1 to 200 characters).
    pub name: Option<String>,
    /// New email; needs `current_password`.
    pub email: Option<String>,
    /// New password (8 to 128 characters); needs `current_password`.
    pub password: Option<String>,
    /// The password the account has now, to change `email` or `password`.
    pub current_password: Option<String>,
}

/// Edit the caller's account. Changing `email` or `password` needs `current_password`
/// (403 `invalid_current_password` when wrong); each check of it counts against the
/// account's log-in attempts (429 beyond them). Fields left out stay as they are.
/// Changing the password revokes every access token of the account, this one included:
/// log in again with the new password.
#[utoipa::path(patch, path = "/me", tag = "accounts", request_body = UpdateMeRequest, security(("bearer" = [])),
    responses(
        (status = 200, description = "The account as edited", body = UserResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Wrong `current_password` (`invalid_current_password`)", body = ErrorBody),
        (status = 409, description = "Email taken by another account (`email_taken`)", body = ErrorBody),
        (status = 422, description = "Invalid name, email or password, or `current_password` missing \
            (`current_password_required`)", body = ErrorBody),
        (status = 429, description = "Too many password checks for this account (shared with log-in); retry \
            after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait"))),
        (status = 503, description = "Too many password hashes at once (`busy`)", body = ErrorBody),
    ))]
pub async fn update_me(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<UpdateMeRequest>,
) -> Result<Json<UserResponse>, ApiError> {
    let name = req.name.as_deref().map(UserName::parse).transpose()?;
    let email = req.email.as_deref().map(parse_email).transpose()?;
    let password = req.password.map(Password::parse).transpose()?;
    let sensitive = email.is_some() || password.is_some();
    if sensitive {
        let current = req.current_password.clone().ok_or(ApiError::invalid(
            "current_password_required",
            "changing email or password needs current_password",
        ))?;
        let (email_now, stored) = sqlx::query!("SELECT email, password_hash FROM users WHERE id = $1", user.id)
            .fetch_optional(&state.db)
            .await?
            .map(|row| (row.email, row.password_hash))
            .ok_or(ApiError::ACCOUNT_GONE)?;
        // A token is not a licence to guess the password: these checks share the log-in's
        // per-account allowance.
        throttled(&state, &state.login_throttle, &email_now, "password checks").await?;
        if !verify_password(&state.heavy_work, current, Some(stored)).await? {
            return Err(ApiError::Denied {
                code: "invalid_current_password",
                message: "current_password is not the account's password".into(),
            });
        }
    }
    let password_hash = match password {
        Some(password) => Some(hash_password(&state.heavy_work, password).await?),
        None => None,
    };
    // A new password hash raises the account's token version (a trigger): older tokens stop
    // working, here at once and in other api processes when the notification arrives.
    let updated = sqlx::query_as!(
        ChangedUser,
        r#"UPDATE users SET name = coalesce($2, name), email = coalesce($3, email),
                  password_hash = coalesce($4, password_hash), updated_at = now()
           WHERE id = $1
           RETURNING id, name, email, role AS "role: Role", created_at, deactivated_at, token_version"#,
        user.id,
        name.as_ref().map(UserName::as_str),
        email.as_ref().map(|email| email.as_str()),
        password_hash
    )
    .fetch_optional(&state.db)
    .await
    .on_constraint("users_email_key", || {
        ApiError::conflict("email_taken", "an account with this email already exists")
    })?
    .ok_or(ApiError::ACCOUNT_GONE)?;
    state.revocations.record(user.id, updated.token_version);
    let updated = UserResponse::from(updated);
    if sensitive {
        tracing::info!(user_id = %user.id, "account credentials changed");
    }
    Ok(Json(updated))
}

/// An event together with how many live tickets the caller holds for it.
#[derive(Serialize, ToSchema)]
pub struct MyEvent {
    #[serde(flatten)]
    pub event: Event,
    /// The caller's tickets for this event in orders awaiting payment or paid.
    pub my_tickets: i64,
}

/// Events the caller created (the Go API's meaning), newest first, deleted ones left out;
/// paginated like `GET /events`. Only admins create events, so for other accounts the list
/// is empty; the events a buyer holds tickets for are `GET /me/tickets`.
#[utoipa::path(get, path = "/me/events", tag = "accounts", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the events the caller created", body = [Event],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
    ))]
pub async fn my_events(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Event>>), ApiError> {
    let limit = query.limit()?;
    let mut events = page_of_events(&state.db, Some(user.id), query.cursor, limit + 1).await?;
    let headers = query.finish("/api/v1/me/events", &mut events, |event| event.id);
    Ok((headers, Json(events)))
}

/// Events the caller holds tickets for (orders `PENDING` or `PAID`), soonest first, with how
/// many tickets they hold of each. (`GET /me/events` answered this before it took the Go
/// API's meaning.)
#[utoipa::path(get, path = "/me/tickets", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The events the caller holds tickets for", body = [MyEvent]),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
    ))]
pub async fn my_tickets(State(state): State<AppState>, user: AuthUser) -> Result<Json<Vec<MyEvent>>, ApiError> {
    let held: HashMap<Uuid, i64> = sqlx::query!(
        r#"SELECT o.event_id, count(t.id) AS "tickets!"
           FROM orders o JOIN tickets t ON t.order_id = o.id AND t.status = 'ACTIVE'
           WHERE o.user_id = $1 AND o.status IN ('PENDING', 'PAID')
           GROUP BY o.event_id"#,
        user.id
    )
    .fetch_all(&state.db)
    .await?
    .into_iter()
    .map(|row| (row.event_id, row.tickets))
    .collect();
    let ids: Vec<Uuid> = held.keys().copied().collect();
    let events = events_by_id(&state.db, &ids, false).await?;
    let events = events
        .into_iter()
        .map(|event| MyEvent { my_tickets: held.get(&event.id).copied().unwrap_or_default(), event })
        .collect();
    Ok(Json(events))
}
