//! Liveness and readiness probes for orchestrators and load balancers.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::extract::Json;
use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` (live), `ready` or `unavailable`.
    pub status: &'static str,
    /// Per dependency: `ok` or `unavailable` (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
}

#[derive(Serialize, ToSchema)]
pub struct Checks {
    pub database: &'static str,
    pub broker: &'static str,
    /// The process's background tasks (order inserter, notification listener, …): `ok`, or
    /// `unavailable` once one has stopped, the process then being on its way out.
    pub tasks: &'static str,
}

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health { status: "ok", checks: None })
}

/// The process can do its work: PostgreSQL and RabbitMQ both answer, and its background
/// tasks run.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "A dependency is unavailable, or a background task stopped", body = Health),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (database, broker) = tokio::join!(common::db::answers(&state.db, CHECK_TIMEOUT), broker_ok(&state));
    let tasks = state.tasks_failed.task().is_none();
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let status = if database && broker && tasks { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let health = Health {
        status: if status == StatusCode::OK { "ready" } else { "unavailable" },
        checks: Some(Checks { database: word(database), broker: word(broker), tasks: word(tasks) }),
    };
    (status, Json(health))
}

async fn broker_ok(state: &AppState) -> bool {
    match tokio::time::timeout(CHECK_TIMEOUT, state.amqp.get()).await {
        Ok(Ok(connection)) => connection.status().connected(),
        _ => false,
    }
}
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
