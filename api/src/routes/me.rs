//! The caller's own account and the events they hold tickets for.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::UserResponse;
use super::events::{Event, event_columns};
use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Json;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/me", get(me)).route("/me/events", get(my_events))
}

/// The caller's account.
#[utoipa::path(get, path = "/api/v1/me", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserResponse),
        (status = 401, description = "Missing, invalid or expired token, or the account is gone", body = ErrorBody),
    ))]
pub async fn me(State(state): State<AppState>, user: AuthUser) -> Result<Json<UserResponse>, ApiError> {
    sqlx::query_as::<_, UserResponse>("SELECT id, name, email, role, created_at FROM users WHERE id = $1")
        .bind(user.id)
        .fetch_optional(&state.db)
        .await?
        .map(Json)
        .ok_or(ApiError::Unauthorized("the account of this token no longer exists"))
}

/// An event together with how many live tickets the caller holds for it.
#[derive(Serialize, ToSchema, sqlx::FromRow)]
pub struct MyEvent {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub event: Event,
    /// The caller's tickets for this event in orders awaiting payment or paid.
    pub my_tickets: i64,
}

/// Events the caller holds tickets for (orders `PENDING` or `PAID`), soonest first.
#[utoipa::path(get, path = "/api/v1/me/events", tag = "accounts", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's events", body = [MyEvent]),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
    ))]
pub async fn my_events(State(state): State<AppState>, user: AuthUser) -> Result<Json<Vec<MyEvent>>, ApiError> {
    let events = sqlx::query_as::<_, MyEvent>(concat!(
        "SELECT ",
        event_columns!(),
        ", count(t.id) AS my_tickets
         FROM orders o
         JOIN tickets t ON t.order_id = o.id AND t.status = 'ACTIVE'
         JOIN events e ON e.id = o.event_id AND e.deleted_at IS NULL
         WHERE o.user_id = $1 AND o.status IN ('PENDING', 'PAID')
         GROUP BY e.id
         ORDER BY e.starts_at, e.id"
    ))
    .bind(user.id)
    .fetch_all(&state.db)
    .await?;
    Ok(Json(events))
}
