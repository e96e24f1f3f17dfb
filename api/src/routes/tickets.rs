//! Tickets at the door: the holder's QR code, and the door staff's check-in scan.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use common::domain::{OrderStatus, TicketStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::{AuthUser, DoorStaff};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ticket_qr)).routes(routes!(check_in))
}

/// What decides whether a ticket gets in.
struct TicketState {
    ticket_status: TicketStatus,
    order_status: OrderStatus,
    event_deleted: bool,
}

impl TicketState {
    /// Why this ticket cannot be used, if it cannot.
    fn refusal(&self) -> Option<ApiError> {
        if self.ticket_status != TicketStatus::Active {
            Some(ApiError::invalid("ticket_cancelled", "this ticket was cancelled"))
        } else if self.order_status != OrderStatus::Paid {
            Some(ApiError::invalid("not_paid", "this ticket's order is not paid"))
        } else if self.event_deleted {
            Some(ApiError::invalid("event_unavailable", "this ticket's event was deleted"))
        } else {
            None
        }
    }
}

/// The ticket's check-in code as a QR image (PNG), for its holder; the order must be paid.
#[utoipa::path(get, path = "/tickets/{id}/qr.png", tag = "tickets", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Ticket id")),
    responses(
        (status = 200, description = "PNG image of the code", content_type = "image/png", body = Vec<u8>),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such ticket, or not the caller's", body = ErrorBody),
        (status = 422, description = "Not usable: order not paid (`not_paid`), ticket cancelled \
            (`ticket_cancelled`) or event deleted (`event_unavailable`)", body = ErrorBody),
    ))]
pub async fn ticket_qr(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Response, ApiError> {
    let ticket = sqlx::query_as!(
        TicketState,
        r#"SELECT t.status AS "ticket_status: TicketStatus", o.status AS "order_status: OrderStatus",
                  e.deleted_at IS NOT NULL AS "event_deleted!"
           FROM tickets t JOIN orders o ON o.id = t.order_id JOIN events e ON e.id = t.event_id
           WHERE t.id = $1 AND o.user_id = $2"#,
        id,
        user.id
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or(ApiError::NotFound("ticket"))?;
    if let Some(refusal) = ticket.refusal() {
        return Err(refusal);
    }
    let code = state.ticket_codes.code(id);
    let png = tokio::task::spawn_blocking(move || qr_png(&code)).await.map_err(anyhow::Error::from)??;
    let mut response = png.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    Ok(response)
}

fn qr_png(code: &str) -> anyhow::Result<Vec<u8>> {
    let image = qrcode::QrCode::new(code.as_bytes())?.render::<image::Luma<u8>>().min_dimensions(256, 256).build();
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(png.into_inner())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckInRequest {
    /// The code from the ticket's QR image.
    pub code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckIn {
    pub ticket_id: Uuid,
    pub order_id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub event_date: DateTime<Utc>,
    pub ticket_type_id: Uuid,
    /// What the ticket admits to ("VIP", "General admission"): its type's name now.
    pub ticket_type: String,
    pub holder_name: String,
    pub holder_email: String,
    pub checked_in_at: DateTime<Utc>,
}

/// Scan a ticket at the door (door staff: the `staff` or `admin` role). The first scan of a valid, paid ticket answers 200
/// and records the check-in; every later scan answers 409 `already_checked_in` with the
/// time of the first (of concurrent scans of one code, exactly one gets 200). A forged or
/// altered code is 404 without a database lookup.
#[utoipa::path(post, path = "/check-ins", tag = "tickets", request_body = CheckInRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Checked in", body = CheckIn),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is neither staff nor an admin", body = ErrorBody),
        (status = 404, description = "Unknown or forged code (`not_found`)", body = ErrorBody),
        (status = 409, description = "Checked in before (`already_checked_in`, with `checked_in_at`)", body = ErrorBody),
        (status = 422, description = "Order not paid (`not_paid`), ticket cancelled (`ticket_cancelled`) or event \
            deleted (`event_unavailable`)", body = ErrorBody),
    ))]
pub async fn check_in(
    State(state): State<AppState>,
    DoorStaff(scanner): DoorStaff,
    Json(req): Json<CheckInRequest>,
) -> Result<Json<CheckIn>, ApiError> {
    let ticket_id = state.ticket_codes.verify(&req.code).ok_or(ApiError::NotFound("ticket"))?;
    let mut tx = state.db.begin().await?;
    let ticket = sqlx::query_as!(
        TicketState,
        r#"SELECT t.status AS "ticket_status: TicketStatus", o.status AS "order_status: OrderStatus",
                  e.deleted_at IS NOT NULL AS "event_deleted!"
           FROM tickets t JOIN orders o ON o.id = t.order_id JOIN events e ON e.id = t.event_id
           WHERE t.id = $1 FOR SHARE OF t"#,
        ticket_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("ticket"))?;
    if let Some(refusal) = ticket.refusal() {
        return Err(refusal);
    }
    // The primary key decides concurrent scans: one insert wins, the others see its row.
    let first: Option<DateTime<Utc>> = sqlx::query_scalar!(
        "INSERT INTO check_ins (ticket_id, checked_in_by) VALUES ($1, $2)
         ON CONFLICT (ticket_id) DO NOTHING RETURNING checked_in_at",
        ticket_id,
        scanner.id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if first.is_none() {
        let at: DateTime<Utc> =
            sqlx::query_scalar!("SELECT checked_in_at FROM check_ins WHERE ticket_id = $1", ticket_id)
                .fetch_one(&mut *tx)
                .await?;
        return Err(ApiError::AlreadyCheckedIn { at });
    }
    let check_in = sqlx::query_as!(
        CheckIn,
        "SELECT t.id AS ticket_id, o.id AS order_id, e.id AS event_id, e.name AS event_name,
                e.starts_at AS event_date, t.ticket_type_id, tt.name AS ticket_type, u.name AS holder_name,
                u.email AS holder_email, c.checked_in_at
         FROM tickets t JOIN orders o ON o.id = t.order_id JOIN events e ON e.id = t.event_id
              JOIN ticket_types tt ON tt.id = t.ticket_type_id
              JOIN users u ON u.id = o.user_id JOIN check_ins c ON c.ticket_id = t.id
         WHERE t.id = $1",
        ticket_id
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%ticket_id, scanned_by = %scanner.id, "ticket checked in");
    Ok(Json(check_in))
}
