//! Administration of accounts: list them, change a role.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, patch};
use common::domain::Role;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::accounts::{ChangedUser, UserResponse};
use super::page::PageQuery;
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/users", get(list_users)).route("/users/{id}/role", patch(set_role))
}

/// Every account, newest first (admin).
#[utoipa::path(get, path = "/api/v1/users", tag = "accounts", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of accounts", body = [UserResponse],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
    ))]
pub async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<UserResponse>>), ApiError> {
    let limit = query.limit()?;
    let mut users = sqlx::query_as!(
        UserResponse,
        r#"SELECT id, name, email, role AS "role: Role", created_at FROM users
           WHERE ($1::uuid IS NULL OR id < $1) ORDER BY id DESC LIMIT $2"#,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/users", &mut users, |user| user.id);
    Ok((headers, Json(users)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRoleRequest {
    pub role: Role,
}

/// Give an account the `admin`, `staff` (door staff: may check tickets in, nothing else an
/// admin may do) or `user` role (admin). A change revokes the account's access
/// tokens at once (they carry the role); it applies from its next log-in. The last admin
/// cannot be demoted (409 `last_admin`).
#[utoipa::path(patch, path = "/api/v1/users/{id}/role", tag = "accounts", request_body = SetRoleRequest,
    params(("id" = Uuid, Path, description = "User id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The account with its new role", body = UserResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "It is the last admin (`last_admin`)", body = ErrorBody),
        (status = 422, description = "Unknown role (`invalid_body`)", body = ErrorBody),
    ))]
pub async fn set_role(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    Json(req): Json<SetRoleRequest>,
) -> Result<Json<UserResponse>, ApiError> {
    let mut tx = state.db.begin().await?;
    // Locking the admins serialises concurrent demotions, so two cannot remove the last two.
    let admins: Vec<Uuid> =
        sqlx::query_scalar!("SELECT id FROM users WHERE role = 'admin' FOR UPDATE").fetch_all(&mut *tx).await?;
    if req.role != Role::Admin && admins == [id] {
        return Err(ApiError::conflict("last_admin", "this is the only admin; promote another account first"));
    }
    // A different role raises the account's token version (a trigger): its tokens stop working.
    let changed = sqlx::query_as!(
        ChangedUser,
        r#"UPDATE users SET role = $2, updated_at = now() WHERE id = $1
           RETURNING id, name, email, role AS "role: Role", created_at, token_version"#,
        id,
        req.role as Role
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("user"))?;
    tx.commit().await?;
    state.revocations.record(id, changed.token_version);
    let user = UserResponse::from(changed);
    tracing::info!(user_id = %id, admin_id = %admin.id, role = ?req.role, "role changed");
    Ok(Json(user))
}
