//! Administration of accounts: list them, change a role, deactivate, reactivate or delete one.
//! Each of the last three revokes the account's tokens in every api process (migration 0015).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use common::domain::Role;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::accounts::{ChangedUser, UserResponse};
use super::page::PageQuery;
use crate::auth::{AdminUser, AuthUser};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users))
        .routes(routes!(delete_user))
        .routes(routes!(set_role))
        .routes(routes!(deactivate))
        .routes(routes!(reactivate))
}

/// Every account, newest first (admin).
#[utoipa::path(get, path = "/users", tag = "accounts", params(PageQuery), security(("bearer" = [])),
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
        r#"SELECT id, name, email, role AS "role: Role", created_at, deactivated_at FROM users
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
#[utoipa::path(patch, path = "/users/{id}/role", tag = "accounts", request_body = SetRoleRequest,
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
    if req.role != Role::Admin {
        keep_an_admin(&mut tx, id).await?;
    }
    // A different role raises the account's token version (a trigger): its tokens stop working.
    let changed = sqlx::query_as!(
        ChangedUser,
        r#"UPDATE users SET role = $2, updated_at = now() WHERE id = $1
           RETURNING id, name, email, role AS "role: Role", created_at, deactivated_at, token_version"#,
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

/// 409 `last_admin` when `id` is the only active admin, so that no change leaves the
/// deployment without one. Locking the admins serialises concurrent changes, so two cannot
/// remove the last two.
async fn keep_an_admin(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<(), ApiError> {
    let admins: Vec<Uuid> =
        sqlx::query_scalar!("SELECT id FROM users WHERE role = 'admin' AND deactivated_at IS NULL FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
    if admins == [id] {
        return Err(ApiError::conflict("last_admin", "this is the only active admin; promote another account first"));
    }
    Ok(())
}

/// Deactivate an account (admin): it keeps its orders, tickets and events, but can no longer
/// log in (403 `account_deactivated`), and every token issued to it is refused at once, in
/// every api process. Deactivating an account that is already deactivated changes nothing.
/// The last active admin cannot be deactivated (409 `last_admin`).
#[utoipa::path(post, path = "/users/{id}/deactivate", tag = "accounts",
    params(("id" = Uuid, Path, description = "User id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The account, deactivated", body = UserResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "It is the last active admin (`last_admin`)", body = ErrorBody),
    ))]
pub async fn deactivate(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
) -> Result<Json<UserResponse>, ApiError> {
    set_active(&state, admin, id, false).await
}

/// Reactivate a deactivated account (admin): it may log in again; tokens issued before the
/// deactivation stay refused.
#[utoipa::path(post, path = "/users/{id}/reactivate", tag = "accounts",
    params(("id" = Uuid, Path, description = "User id")), security(("bearer" = [])),
    responses(
        (status = 200, description = "The account, active", body = UserResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ))]
pub async fn reactivate(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
) -> Result<Json<UserResponse>, ApiError> {
    set_active(&state, admin, id, true).await
}

async fn set_active(state: &AppState, admin: AuthUser, id: Uuid, active: bool) -> Result<Json<UserResponse>, ApiError> {
    let mut tx = state.db.begin().await?;
    if !active {
        keep_an_admin(&mut tx, id).await?;
    }
    // A change of `deactivated_at` raises the token version (a trigger); setting it to what
    // it already is changes nothing.
    let changed = sqlx::query_as!(
        ChangedUser,
        r#"UPDATE users SET deactivated_at = CASE WHEN $2 THEN NULL ELSE coalesce(deactivated_at, now()) END,
                  updated_at = now()
           WHERE id = $1
           RETURNING id, name, email, role AS "role: Role", created_at, deactivated_at, token_version"#,
        id,
        active
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("user"))?;
    tx.commit().await?;
    state.revocations.record(id, changed.token_version);
    tracing::info!(user_id = %id, admin_id = %admin.id, active, "account activation changed");
    Ok(Json(UserResponse::from(changed)))
}

/// Delete an account (admin). Only an account that nothing refers to can be deleted: one with
/// orders, events, check-ins, refunds, waiting-list entries or webhook endpoints is 409
/// `account_has_records` (deactivate it instead: its records stay, it loses access). Its
/// tokens are refused at once, in every api process. The last active admin cannot be deleted
/// (409 `last_admin`).
#[utoipa::path(delete, path = "/users/{id}", tag = "accounts",
    params(("id" = Uuid, Path, description = "User id")), security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "It is the last active admin (`last_admin`), or records refer to it \
            (`account_has_records`)", body = ErrorBody),
    ))]
pub async fn delete_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.db.begin().await?;
    keep_an_admin(&mut tx, id).await?;
    let deleted = sqlx::query!("DELETE FROM users WHERE id = $1", id).execute(&mut *tx).await;
    let deleted = match deleted {
        Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
            return Err(ApiError::conflict(
                "account_has_records",
                "orders, events or other records refer to this account; deactivate it instead",
            ));
        }
        deleted => deleted?,
    };
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("user"));
    }
    tx.commit().await?;
    state.revocations.record(id, crate::revocations::GONE);
    tracing::info!(user_id = %id, admin_id = %admin.id, "account deleted");
    Ok(StatusCode::NO_CONTENT)
}
