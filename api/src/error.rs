//! The API's one error type and its mapping to HTTP.
//!
//! Every error leaves as `{"error": {"code", "message"}}` with a status that tells the client
//! whose fault it was. Unexpected errors are logged with their detail and answered with a
//! generic 500; database outages become 503 so that clients retry instead of giving up.

use std::panic::Location;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::domain::OrderStatus;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request could not be read (malformed JSON, a bad query string).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 422: well-formed, but breaks a rule; `code` names the rule.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// 401: no valid credentials. The message never says which part was wrong.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: authenticated, but without a role the action requires.
    #[error("this action requires the {0} role")]
    Forbidden(Required),
    /// 403 with a reason of its own (e.g. a wrong current password).
    #[error("{message}")]
    Denied { code: &'static str, message: String },
    /// 404: no such resource (or not one the caller may see).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: conflicts with the current state.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 409 `invalid_transition`: the order's status does not allow this change; the body
    /// names the status it is in.
    #[error("the order is {} and cannot become {target}", current.as_str())]
    InvalidTransition { current: OrderStatus, target: &'static str },
    /// 409 `queue_full`: the event's queued orders already ask for more than its queue
    /// may hold (`QUEUE_DEMAND_FACTOR` times what is left); the body gives both counts and
    /// the waiting list to join instead.
    #[error(
        "the event has {left} tickets left and its queued orders already ask for {queued}; join its waiting list \
         to be offered tickets that come back"
    )]
    QueueFull { event_id: uuid::Uuid, left: i64, queued: i64 },
    /// 409 `already_queued`: the buyer already has an open entry in the event's pre-sale
    /// queue (`order_id`).
    #[error("you already have an order in this event's pre-sale queue ({order_id}); cancel it to place another")]
    AlreadyQueued { order_id: uuid::Uuid },
    /// 409 `already_checked_in`: the ticket was scanned before, at `at`.
    #[error("this ticket was checked in at {}", at.to_rfc3339())]
    AlreadyCheckedIn { at: chrono::DateTime<chrono::Utc> },
    /// 413
    #[error("request body is larger than the limit")]
    PayloadTooLarge,
    /// 415
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: too many attempts; retry after this many seconds (also in `Retry-After`).
    #[error("too many attempts; retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// 503: a dependency (database, broker) is unavailable; retry later.
    #[error("service temporarily unavailable, retry later")]
    Unavailable,
    /// 503: the request took longer than the configured limit.
    #[error("the request took too long; retry later")]
    Timeout,
    /// 503: too many password hashes (or image decodings) at once; retry in a moment.
    #[error("the server is busy with other log-ins; retry in a moment")]
    Busy,
    /// A database error, and where in our code it was met (the `?` that turned it into
    /// this), which the log line names.
    #[error("database error")]
    Database(sqlx::Error, &'static Location<'static>),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `email_taken`, `validation_failed`.
    #[schema(example = "email_taken")]
    pub code: String,
    /// Human-readable explanation; may change between versions.
    pub message: String,
    /// With `invalid_transition`: the status the order is in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_status: Option<OrderStatus>,
    /// With `already_checked_in`: when the ticket was first scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_in_at: Option<chrono::DateTime<chrono::Utc>>,
    /// With `queue_full`: the event's tickets not yet sold or held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tickets_left: Option<i64>,
    /// With `queue_full`: the tickets the event's queued orders ask for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tickets_queued: Option<i64>,
    /// With `already_queued`: the open pre-sale entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<uuid::Uuid>,
    /// With `queue_full`: where to join the event's waiting list (`POST`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "/api/v1/events/0190f1a2-0000-7000-8000-000000000000/waitlist")]
    pub waitlist_url: Option<String>,
}

/// The roles an action requires, named in its 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Required {
    Admin,
    /// Door staff (`staff`) or an admin: checking tickets in.
    DoorStaff,
}

impl std::fmt::Display for Required {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::DoorStaff => "staff or admin",
        })
    }
}

impl ApiError {
    /// 401 for a validly signed token whose account no longer exists.
    pub const ACCOUNT_GONE: ApiError = ApiError::Unauthorized("the account of this token no longer exists");

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { code, message: message.into() }
    }

    /// 400 `invalid_query`: the query string is malformed or out of range.
    pub fn invalid_query(message: impl Into<String>) -> Self {
        Self::BadRequest { code: "invalid_query", message: message.into() }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict { code, message: message.into() }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    /// The stable `error.code` of the answer.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Denied { code, .. } => (StatusCode::FORBIDDEN, code),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Self::InvalidTransition { .. } => (StatusCode::CONFLICT, "invalid_transition"),
            Self::AlreadyCheckedIn { .. } => (StatusCode::CONFLICT, "already_checked_in"),
            Self::QueueFull { .. } => (StatusCode::CONFLICT, "queue_full"),
            Self::AlreadyQueued { .. } => (StatusCode::CONFLICT, "already_queued"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::Database(sqlx::Error::RowNotFound, _) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Database(err, _) if common::db::is_unavailable(err) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Self::Database(..) | Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// The status and JSON body this error is answered with. Logs what must not reach the
    /// client (database and internal details).
    pub fn to_body(&self) -> (StatusCode, ErrorBody) {
        let (status, code) = self.status_and_code();
        let message = match self {
            Self::Database(sqlx::Error::RowNotFound, _) => "resource not found".to_owned(),
            Self::Database(err, at) if common::db::is_unavailable(err) => {
                tracing::warn!(error = %err, %at, "database unavailable");
                Self::Unavailable.to_string()
            }
            Self::Database(err, at) => {
                tracing::error!(error = %err, %at, "database error");
                self.to_string()
            }
            Self::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
                self.to_string()
            }
            other => other.to_string(),
        };
        let current_status = match self {
            Self::InvalidTransition { current, .. } => Some(*current),
            _ => None,
        };
        let checked_in_at = match self {
            Self::AlreadyCheckedIn { at } => Some(*at),
            _ => None,
        };
        let (tickets_left, tickets_queued, waitlist_url) = match self {
            Self::QueueFull { event_id, left, queued } => {
                (Some(*left), Some(*queued), Some(format!("/api/v1/events/{event_id}/waitlist")))
            }
            _ => (None, None, None),
        };
        let order_id = match self {
            Self::AlreadyQueued { order_id } => Some(*order_id),
            _ => None,
        };
        let error = ErrorDetail {
            code: code.to_owned(),
            message,
            current_status,
            checked_in_at,
            tickets_left,
            tickets_queued,
            order_id,
            waitlist_url,
        };
        (status, ErrorBody { error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.to_body();
        let mut response = (status, Json(body)).into_response();
        if let Self::TooManyRequests { retry_after_secs } = self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        match status {
            StatusCode::UNAUTHORIZED => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// A domain value refused at the edge: 422 with the value's own code.
impl From<common::domain::Refusal> for ApiError {
    fn from(refusal: common::domain::Refusal) -> Self {
        Self::invalid(refusal.code, refusal.message)
    }
}

/// Every foreign key that points at `users`: violated when a token's account was deleted
/// between the token's check and the write. A test (`abuse::every_foreign_key_to_users_answers_401`)
/// compares the list with the schema, so a new reference cannot be forgotten.
pub const USER_REFERENCES: [&str; 6] = [
    "events_created_by_fkey",
    "orders_user_id_fkey",
    "webhook_endpoints_user_id_fkey",
    "check_ins_checked_in_by_fkey",
    "refunds_requested_by_fkey",
    "waitlist_entries_user_id_fkey",
];

impl From<sqlx::Error> for ApiError {
    /// What the database refuses because of the caller rather than a bug: a write on behalf
    /// of an account that was deleted after its token was issued is 401, like any other
    /// request with that token; text PostgreSQL cannot store (a NUL character, should a
    /// check at the edge have missed it) is 422. Any other error keeps the place it came
    /// from (`?` passes its own location).
    #[track_caller]
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            if db.is_foreign_key_violation() && db.constraint().is_some_and(|name| USER_REFERENCES.contains(&name)) {
                return Self::ACCOUNT_GONE;
            }
            // 22021 character_not_in_repertoire; 22P05 untranslatable_character.
            if matches!(db.code().as_deref(), Some("22021" | "22P05")) {
                return Self::invalid("invalid_text", "text must not contain NUL characters");
            }
        }
        Self::Database(err, Location::caller())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(err) => Self::invalid("invalid_body", err.body_text()),
            JsonRejection::JsonSyntaxError(err) => {
                Self::BadRequest { code: "malformed_json", message: err.body_text() }
            }
            JsonRejection::MissingJsonContentType(_) => {
                Self::UnsupportedMediaType("expected a request with `Content-Type: application/json`".into())
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::BadRequest { code: "bad_request", message: other.body_text() },
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid_query(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    /// A path segment that cannot name a resource (e.g. an id that is not a UUID) names
    /// nothing that exists: 404.
    fn from(_: PathRejection) -> Self {
        Self::NotFound("resource")
    }
}

/// Turns a named constraint violation into a client error; other errors pass through.
pub trait ResultExt<T> {
    fn on_constraint(self, name: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T, E: Into<ApiError>> ResultExt<T> for Result<T, E> {
    #[track_caller]
    fn on_constraint(self, name: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        let at = Location::caller();
        self.map_err(|err| match err.into() {
            ApiError::Database(sqlx::Error::Database(db), _) if db.constraint() == Some(name) => map(),
            ApiError::Database(err, _) => ApiError::Database(err, at),
            other => other,
        })
    }
}

/// Fallback for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

/// Fallback for a known route called with the wrong method.
pub async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "method_not_allowed".into(),
            message: "this route does not accept that method".into(),
            ..ErrorDetail::default()
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing_query() -> Result<(), sqlx::Error> {
        Err(sqlx::Error::PoolTimedOut)
    }

    #[test]
    fn a_database_error_names_the_place_it_was_met() {
        let handler = || -> Result<(), ApiError> {
            failing_query()?;
            Ok(())
        };
        let line = line!() - 3;
        let Err(ApiError::Database(_, at)) = handler() else { panic!("a database error") };
        assert_eq!((at.file(), at.line()), (file!(), line));

        let insert =
            || -> Result<(), ApiError> { failing_query().on_constraint("some_constraint", || ApiError::Unavailable) };
        let line = line!() - 1;
        let Err(ApiError::Database(_, at)) = insert() else { panic!("a database error") };
        assert_eq!((at.file(), at.line()), (file!(), line));
    }
}
