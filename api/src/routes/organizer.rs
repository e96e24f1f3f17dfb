//! What an organizer reads about an event (admin): its orders, and its attendees (the paid
//! tickets, with their check-in), as JSON pages or as one CSV export.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use common::domain::OrderStatus;
use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(event_orders)).routes(routes!(attendees))
}

/// Rows one query of a CSV export reads: the export is read in pages this size, so memory
/// stays bounded and no connection is held while the client reads slowly.
const CSV_PAGE: i64 = 1_000;

/// An order of the event, with its buyer.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventOrder {
    pub id: Uuid,
    pub user_id: Uuid,
    pub buyer_name: String,
    pub buyer_email: String,
    pub quantity: i32,
    /// For an order of one line; empty for several (the order's `items` say which types).
    #[schema(value_type = Option<String>, example = "49.90")]
    #[serde(serialize_with = "common::domain::money::serialize_option")]
    pub unit_price: Option<Decimal>,
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub total: Decimal,
    #[schema(example = "EUR")]
    pub currency: String,
    /// The promo code the order was placed with, as the organizer wrote it.
    pub promo_code: Option<String>,
    /// What the promo code took off the total.
    #[schema(value_type = String, example = "0.00")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub discount: Decimal,
    pub status: OrderStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A ticket of a paid order: who holds it, and whether it was scanned at the door.
#[derive(Debug, Serialize, ToSchema)]
pub struct Attendee {
    pub ticket_id: Uuid,
    pub order_id: Uuid,
    pub holder_name: String,
    pub holder_email: String,
    pub ticket_type_id: Uuid,
    /// The ticket type's name now.
    pub ticket_type: String,
    /// The promo code the ticket was sold under, if any.
    pub promo_code: Option<String>,
    /// When the ticket was first scanned at the door; `null` while it was not.
    pub checked_in_at: Option<DateTime<Utc>>,
}

/// A row of a list: its key for the next page, its CSV columns, and how it goes into CSV.
trait Row: Serialize + Send + 'static {
    /// The columns, in field order (a unit test compares them with the serialised fields).
    const CSV_HEADER: &'static [&'static str];
    fn key(&self) -> Uuid;
    /// The row with every free-text cell made safe for spreadsheets.
    fn for_csv(self) -> Self;
}

impl Row for EventOrder {
    const CSV_HEADER: &'static [&'static str] = &[
        "id",
        "user_id",
        "buyer_name",
        "buyer_email",
        "quantity",
        "unit_price",
        "total",
        "currency",
        "promo_code",
        "discount",
        "status",
        "reason",
        "created_at",
        "updated_at",
        "expires_at",
    ];
    fn key(&self) -> Uuid {
        self.id
    }
    fn for_csv(self) -> Self {
        Self {
            buyer_name: spreadsheet_safe(self.buyer_name),
            buyer_email: spreadsheet_safe(self.buyer_email),
            reason: self.reason.map(spreadsheet_safe),
            // A code may start with `-`.
            promo_code: self.promo_code.map(spreadsheet_safe),
            ..self
        }
    }
}

impl Row for Attendee {
    const CSV_HEADER: &'static [&'static str] = &[
        "ticket_id",
        "order_id",
        "holder_name",
        "holder_email",
        "ticket_type_id",
        "ticket_type",
        "promo_code",
        "checked_in_at",
    ];
    fn key(&self) -> Uuid {
        self.ticket_id
    }
    fn for_csv(self) -> Self {
        Self {
            holder_name: spreadsheet_safe(self.holder_name),
            holder_email: spreadsheet_safe(self.holder_email),
            ticket_type: spreadsheet_safe(self.ticket_type),
            promo_code: self.promo_code.map(spreadsheet_safe),
            ..self
        }
    }
}

/// A cell a spreadsheet would run as a formula (it starts with `=`, `+`, `-`, `@`, `|`, a
/// tab or a carriage return, after any invisible characters such as a zero-width space or a
/// byte-order mark, which spreadsheets skip) gets a leading `'`, so a buyer's name cannot
/// become a formula in the organizer's spreadsheet (OWASP "CSV injection").
fn spreadsheet_safe(text: String) -> String {
    const INVISIBLE: [char; 5] = ['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}'];
    let visible = text.trim_start_matches(|c: char| INVISIBLE.contains(&c) || c == ' ');
    if visible.starts_with(['=', '+', '-', '@', '|', '\t', '\r']) { format!("'{text}") } else { text }
}

/// One page of a list, from `cursor` on (newest first), at most `limit` rows.
type Fetch<T> = Arc<dyn Fn(Option<Uuid>, i64) -> BoxFuture<'static, sqlx::Result<Vec<T>>> + Send + Sync>;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OrdersQuery {
    /// Only orders in these statuses, comma-separated (`PAID` or `PENDING,PAID`).
    #[param(example = "PAID")]
    pub status: Option<String>,
    /// JSON page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Cursor of the next JSON page (`X-Next-Cursor`).
    pub cursor: Option<Uuid>,
    /// `json` (default) or `csv`: every matching row as one CSV file. `Accept: text/csv`
    /// asks for CSV too.
    pub format: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AttendeesQuery {
    /// `true`: only tickets scanned at the door; `false`: only those not yet scanned.
    pub checked_in: Option<bool>,
    /// JSON page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Cursor of the next JSON page (`X-Next-Cursor`).
    pub cursor: Option<Uuid>,
    /// `json` (default) or `csv`: every matching row as one CSV file. `Accept: text/csv`
    /// asks for CSV too.
    pub format: Option<String>,
}

/// The event's orders, newest first (admin), with their buyers; filter by `status`.
/// Deleted events keep their lists. JSON pages like `GET /events`, or, with `format=csv`
/// or `Accept: text/csv`, every matching order as one CSV file (a header row; amounts as
/// in JSON; text cells that a spreadsheet would run as a formula start with `'`).
#[utoipa::path(get, path = "/events/{id}/orders", tag = "organizers", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Event id"), OrdersQuery),
    responses(
        (status = 200, description = "One page of orders (JSON), or all of them (CSV)",
            content(([EventOrder] = "application/json"), (String = "text/csv")),
            headers(("Link" = String, description = "JSON: `<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "JSON: cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string: unknown status or format, a page asked of a CSV \
            export (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn event_orders(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
    Query(query): Query<OrdersQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let statuses = query.status.as_deref().map(parse_statuses).transpose()?;
    let csv = wants_csv(query.format.as_deref(), &headers)?;
    ensure_event(&state.db, id).await?;
    let db = state.db.clone();
    let filter: Option<Vec<&'static str>> = statuses.map(|s| s.into_iter().map(OrderStatus::as_str).collect());
    let path = match &query.status {
        Some(status) => format!("/api/v1/events/{id}/orders?status={}", status.replace(',', "%2C")),
        None => format!("/api/v1/events/{id}/orders"),
    };
    let fetch: Fetch<EventOrder> = Arc::new(move |cursor, limit| {
        let (db, filter) = (db.clone(), filter.clone());
        Box::pin(async move {
            sqlx::query_as!(
                EventOrder,
                r#"SELECT o.id, o.user_id, u.name AS buyer_name, u.email AS buyer_email, o.quantity, o.unit_price,
                          o.total, o.currency, o.promo_code, o.discount, o.status AS "status: OrderStatus",
                          o.reason, o.created_at, o.updated_at, o.expires_at
                   FROM orders o JOIN users u ON u.id = o.user_id
                   WHERE o.event_id = $1 AND ($2::text[] IS NULL OR o.status = ANY($2))
                     AND ($3::uuid IS NULL OR o.id < $3)
                   ORDER BY o.id DESC LIMIT $4"#,
                id,
                filter.as_deref() as Option<&[&str]>,
                cursor,
                limit
            )
            .fetch_all(&db)
            .await
        })
    });
    let page = PageQuery { limit: query.limit, cursor: query.cursor };
    respond(fetch, csv, page, &path, &format!("event-{id}-orders.csv")).await
}

/// The event's attendees (admin): one row per ticket of its paid orders, newest first, with
/// the holder and the check-in time; filter by `checked_in`. Cancelled tickets are not
/// attendees. JSON pages, or every matching ticket as one CSV file (see the orders list).
#[utoipa::path(get, path = "/events/{id}/attendees", tag = "organizers", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Event id"), AttendeesQuery),
    responses(
        (status = 200, description = "One page of attendees (JSON), or all of them (CSV)",
            content(([Attendee] = "application/json"), (String = "text/csv")),
            headers(("Link" = String, description = "JSON: `<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "JSON: cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string: unknown format, a page asked of a CSV export \
            (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
    ))]
pub async fn attendees(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<Uuid>,
    Query(query): Query<AttendeesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let csv = wants_csv(query.format.as_deref(), &headers)?;
    ensure_event(&state.db, id).await?;
    let db = state.db.clone();
    let checked_in = query.checked_in;
    let path = match checked_in {
        Some(checked_in) => format!("/api/v1/events/{id}/attendees?checked_in={checked_in}"),
        None => format!("/api/v1/events/{id}/attendees"),
    };
    let fetch: Fetch<Attendee> = Arc::new(move |cursor, limit| {
        let db = db.clone();
        Box::pin(async move {
            sqlx::query_as!(
                Attendee,
                r#"SELECT t.id AS ticket_id, o.id AS order_id, u.name AS holder_name, u.email AS holder_email,
                          t.ticket_type_id, tt.name AS ticket_type,
                          CASE WHEN t.promo_code_id IS NOT NULL THEN o.promo_code END AS promo_code,
                          c.checked_in_at AS "checked_in_at?"
                   FROM tickets t JOIN orders o ON o.id = t.order_id JOIN users u ON u.id = o.user_id
                        JOIN ticket_types tt ON tt.id = t.ticket_type_id
                        LEFT JOIN check_ins c ON c.ticket_id = t.id
                   WHERE t.event_id = $1 AND t.status = 'ACTIVE' AND o.status = 'PAID'
                     AND ($2::bool IS NULL OR (c.ticket_id IS NOT NULL) = $2)
                     AND ($3::uuid IS NULL OR t.id < $3)
                   ORDER BY t.id DESC LIMIT $4"#,
                id,
                checked_in,
                cursor,
                limit
            )
            .fetch_all(&db)
            .await
        })
    });
    let page = PageQuery { limit: query.limit, cursor: query.cursor };
    respond(fetch, csv, page, &path, &format!("event-{id}-attendees.csv")).await
}

/// 404 unless the event exists (deleted or not: its orders still matter to the organizer).
async fn ensure_event(db: &PgPool, id: Uuid) -> Result<(), ApiError> {
    sqlx::query_scalar!("SELECT 1 FROM events WHERE id = $1", id)
        .fetch_optional(db)
        .await?
        .ok_or(ApiError::NotFound("event"))?;
    Ok(())
}

/// `status=PAID,PENDING` → the statuses, each known.
fn parse_statuses(text: &str) -> Result<Vec<OrderStatus>, ApiError> {
    text.split(',')
        .map(|name| {
            OrderStatus::ALL.into_iter().find(|status| status.as_str() == name.trim()).ok_or_else(|| {
                let known: Vec<&str> = OrderStatus::ALL.into_iter().map(OrderStatus::as_str).collect();
                ApiError::invalid_query(format!("unknown status `{name}`; one or more of {}", known.join(", ")))
            })
        })
        .collect()
}

/// Whether the caller asked for CSV: `format=csv`, or no `format` and `Accept: text/csv`.
fn wants_csv(format: Option<&str>, headers: &HeaderMap) -> Result<bool, ApiError> {
    match format {
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(_) => Err(ApiError::invalid_query("format must be `json` or `csv`")),
        None => Ok(headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|media| media.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("text/csv")))),
    }
}

/// A JSON page, or the CSV export of every row (read in pages of [`CSV_PAGE`]).
async fn respond<T: Row>(
    fetch: Fetch<T>,
    csv: bool,
    page: PageQuery,
    path: &str,
    filename: &str,
) -> Result<Response, ApiError> {
    if !csv {
        let limit = page.limit()?;
        let mut rows = fetch(page.cursor, limit + 1).await?;
        let headers = page.finish(path, &mut rows, T::key);
        return Ok((headers, Json(rows)).into_response());
    }
    if page.limit.is_some() || page.cursor.is_some() {
        return Err(ApiError::invalid_query("a CSV export holds every row: leave out `limit` and `cursor`"));
    }
    // The first page is read before answering, so a database failure is still a clean 503.
    let first = fetch(None, CSV_PAGE).await?;
    let stream = futures_util::stream::try_unfold(Some((first, true)), move |state| {
        let fetch = fetch.clone();
        async move {
            let Some((rows, first)) = state else { return Ok::<_, anyhow::Error>(None) };
            let last = rows.last().map(T::key);
            let full = rows.len() as i64 == CSV_PAGE;
            let chunk = csv_chunk(rows, first)?;
            let next = match last {
                // A full page may have more behind it.
                Some(last) if full => Some((fetch(Some(last), CSV_PAGE).await?, false)),
                _ => None,
            };
            Ok(Some((chunk, next)))
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(disposition) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

/// Rows as CSV text; the first chunk starts with the header row.
fn csv_chunk<T: Row>(rows: Vec<T>, header: bool) -> anyhow::Result<Bytes> {
    let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    if header {
        writer.write_record(T::CSV_HEADER)?;
    }
    for row in rows {
        writer.serialize(row.for_csv())?;
    }
    Ok(Bytes::from(writer.into_inner().map_err(|err| anyhow::anyhow!("{err}"))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of<T: Row>(row: T) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.serialize(row).unwrap();
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        text.lines().next().unwrap().to_owned()
    }

    #[test]
    fn csv_headers_name_the_fields() {
        let order = EventOrder {
            id: Uuid::nil(),
            user_id: Uuid::nil(),
            buyer_name: "Ada".into(),
            buyer_email: "ada@example.com".into(),
            quantity: 1,
            unit_price: Some(Decimal::ONE),
            total: Decimal::ONE,
            currency: "EUR".into(),
            promo_code: Some("-SPRING".into()),
            discount: Decimal::ZERO,
            status: OrderStatus::Paid,
            reason: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            expires_at: None,
        };
        assert_eq!(header_of(order), EventOrder::CSV_HEADER.join(","));
        let attendee = Attendee {
            ticket_id: Uuid::nil(),
            order_id: Uuid::nil(),
            holder_name: "Ada".into(),
            holder_email: "ada@example.com".into(),
            ticket_type_id: Uuid::nil(),
            ticket_type: "General admission".into(),
            promo_code: None,
            checked_in_at: None,
        };
        assert_eq!(header_of(attendee), Attendee::CSV_HEADER.join(","));
    }

    #[test]
    fn formulas_are_defused() {
        assert_eq!(spreadsheet_safe("=HYPERLINK(\"x\")".into()), "'=HYPERLINK(\"x\")");
        assert_eq!(spreadsheet_safe("@SUM(A1)".into()), "'@SUM(A1)");
        assert_eq!(spreadsheet_safe("Ada Lovelace".into()), "Ada Lovelace");
        // Finding 10 (issue 29): behind invisible characters, and a leading `|`.
        assert_eq!(spreadsheet_safe("\u{200B}=1+1".into()), "'\u{200B}=1+1");
        assert_eq!(spreadsheet_safe("\u{FEFF}=1+1".into()), "'\u{FEFF}=1+1");
        assert_eq!(spreadsheet_safe("|calc".into()), "'|calc");
        assert_eq!(spreadsheet_safe("Ada | Grace".into()), "Ada | Grace");
    }

    #[test]
    fn csv_is_asked_for_by_format_or_accept() {
        let mut accept = HeaderMap::new();
        accept.insert(header::ACCEPT, HeaderValue::from_static("application/json;q=0.5, text/csv"));
        assert!(wants_csv(None, &accept).unwrap());
        assert!(!wants_csv(Some("json"), &accept).unwrap());
        assert!(wants_csv(Some("csv"), &HeaderMap::new()).unwrap());
        assert!(!wants_csv(None, &HeaderMap::new()).unwrap());
        assert!(wants_csv(Some("xml"), &HeaderMap::new()).is_err());
    }

    #[test]
    fn statuses_are_checked() {
        assert_eq!(parse_statuses("PAID,PENDING").unwrap(), [OrderStatus::Paid, OrderStatus::Pending]);
        assert!(parse_statuses("paid").is_err());
        assert!(parse_statuses("PAID,").is_err());
    }
}
