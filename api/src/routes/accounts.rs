//! Accounts: sign up and log in.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::domain::{Email, Password, Role, UserName};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{hash_password, verify_password};
use crate::error::{ApiError, ErrorBody, ResultExt};
use crate::extract::Json;
use crate::state::AppState;
use crate::throttle::{Refused, Throttle};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(signup)).routes(routes!(login))
}

#[derive(Deserialize, ToSchema)]
pub struct SignupRequest {
    #[schema(example = "Ada Lovelace")]
    pub name: String,
    /// Trimmed and compared case-insensitively.
    #[schema(example = "ada@example.com")]
    pub email: String,
    /// 8 to 128 characters.
    #[schema(example = "correct horse battery staple")]
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserResponse {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// When an admin deactivated the account (`null`: active). A deactivated account cannot
    /// log in, and its tokens are refused.
    pub deactivated_at: Option<DateTime<Utc>>,
}

/// An account as a change left it, with the token version the change left it at (a new
/// password or role raises it: older tokens stop working).
pub struct ChangedUser {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub token_version: i32,
}

impl From<ChangedUser> for UserResponse {
    fn from(user: ChangedUser) -> Self {
        Self {
            id: user.id,
            name: user.name,
            email: user.email,
            role: user.role,
            created_at: user.created_at,
            deactivated_at: user.deactivated_at,
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    #[schema(example = "ada@example.com")]
    pub email: String,
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

pub fn parse_email(email: &str) -> Result<Email, ApiError> {
    Email::parse(email).map_err(|message| ApiError::invalid("invalid_email", message))
}

/// Inserts a user; 409 `email_taken` when the address is registered already.
pub async fn insert_user(
    db: &sqlx::PgPool,
    name: &UserName,
    email: &Email,
    password_hash: &str,
    role: Role,
) -> Result<UserResponse, ApiError> {
    sqlx::query_as!(
        UserResponse,
        r#"INSERT INTO users (id, name, email, password_hash, role) VALUES ($1, $2, $3, $4, $5)
           RETURNING id, name, email, role AS "role: Role", created_at, deactivated_at"#,
        Uuid::now_v7(),
        name.as_str(),
        email.as_str(),
        password_hash,
        role as Role
    )
    .fetch_one(db)
    .await
    .on_constraint("users_email_key", || ApiError::conflict("email_taken", "an account with this email already exists"))
}

/// Create an account (role `user`).
#[utoipa::path(post, path = "/signup", tag = "accounts", request_body = SignupRequest,
    responses(
        (status = 201, description = "Account created", body = UserResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "Email already registered (`email_taken`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid name, email or password", body = ErrorBody),
        (status = 429, description = "Too many sign-ups from this address; retry after `Retry-After` seconds",
            body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait"))),
        (status = 503, description = "Too many password hashes at once (`busy`); retry after `Retry-After` seconds",
            body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait"))),
    ))]
pub async fn signup(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(req): Json<SignupRequest>,
) -> Result<(StatusCode, Json<UserResponse>), ApiError> {
    throttled(&state, &state.signup_throttle, &client.ip().to_string(), "sign-ups").await?;
    let name = UserName::parse(&req.name)?;
    let email = parse_email(&req.email)?;
    let password = Password::parse(req.password)?;
    let hash = hash_password(&state.heavy_work, password).await?;
    let user = insert_user(&state.db, &name, &email, &hash, Role::User).await?;
    tracing::info!(user_id = %user.id, "user signed up");
    Ok((StatusCode::CREATED, Json(user)))
}

/// Exchange email and password for an access token.
#[utoipa::path(post, path = "/login", tag = "accounts", request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Wrong email or password (which one is not said)", body = ErrorBody),
        (status = 403, description = "Right password, but an admin deactivated the account (`account_deactivated`)",
            body = ErrorBody),
        (status = 422, description = "Missing fields", body = ErrorBody),
        (status = 429, description = "Too many attempts at this account, or from this address; retry after \
            `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait"))),
        (status = 503, description = "Too many log-ins at once (`busy`); retry after `Retry-After` seconds",
            body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait"))),
    ))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(req): Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    const WRONG: ApiError = ApiError::Unauthorized("invalid email or password");
    // Counted before any work: a guess over either limit costs no hashing. Per address,
    // so that made-up emails do not each get a fresh allowance; per account, so that a
    // guess at one account from many addresses is still a guess at one account.
    throttled(&state, &state.login_address_throttle, &client.ip().to_string(), "login attempts from one address")
        .await?;
    throttled(&state, &state.login_throttle, &req.email, "login attempts").await?;
    // A malformed address cannot belong to an account; it gets the same answer (and the
    // same hashing work) as an unknown one.
    let email = Email::parse(&req.email).ok();
    let account = match &email {
        Some(email) => sqlx::query!(
            r#"SELECT id, role AS "role: Role", password_hash, token_version, deactivated_at IS NOT NULL AS "deactivated!"
               FROM users WHERE email = $1"#,
            email.as_str()
        )
        .fetch_optional(&state.db)
        .await?,
        None => None,
    };
    let stored = account.as_ref().map(|row| row.password_hash.clone());
    if !verify_password(&state.heavy_work, req.password, stored).await? {
        return Err(WRONG);
    }
    let account = account.ok_or(WRONG)?;
    // Said only to whoever knows the password.
    if account.deactivated {
        return Err(ApiError::Denied {
            code: "account_deactivated",
            message: "this account was deactivated by an admin".into(),
        });
    }
    let (id, role, version) = (account.id, account.role, account.token_version);
    let access_token = state.tokens.issue(id, role, version)?;
    Ok(Json(TokenResponse { access_token, token_type: "Bearer", expires_in: state.tokens.ttl().as_secs() }))
}

/// Locks the account's row in `tx` (`FOR NO KEY UPDATE`), so that a count of what it owns
/// and the insert that follows are one step per account: concurrent requests of one user
/// take turns, and a limit holds exactly. 401 when the account is gone.
pub(crate) async fn lock_account(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<(), ApiError> {
    sqlx::query!("SELECT 1 AS locked FROM users WHERE id = $1 FOR NO KEY UPDATE", user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::ACCOUNT_GONE)?;
    Ok(())
}

/// Counts an attempt under `key`; over the limit, `429` with the seconds to wait. The
/// limits hold across api processes (they are kept in PostgreSQL).
pub(crate) async fn throttled(
    state: &AppState,
    throttle: &Throttle,
    key: &str,
    what: &'static str,
) -> Result<(), ApiError> {
    throttle.attempt(&state.db, key).await.map_err(|refused| match refused {
        Refused::Wait(wait) => {
            tracing::warn!(what, "over the rate limit");
            metrics::counter!("turnstile_rate_limited_total", "limit" => throttle.name()).increment(1);
            ApiError::TooManyRequests { retry_after_secs: wait.as_secs() + 1 }
        }
        Refused::Database(err) => ApiError::from(err),
    })
}
