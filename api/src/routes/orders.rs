//! Orders: the purchase request (accepted at once, allocated later by the worker) and the
//! buyer's view of how it turned out.
//!
//! `POST /orders` answers 202 as soon as the order is stored `QUEUED` and its message is
//! handed to the broker (see `purchase::order_inserter::OrderInserter`). The database write is the
//! commitment: if the broker does not confirm, the client still gets 202 and the worker's
//! re-publisher sends the message later; if the database write fails, the client gets 503
//! and nothing was bought.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use chrono::{DateTime, Utc};
use common::domain::{IdempotencyKey, OrderLine, OrderStatus, OrderTrigger, TicketStatus, Transition};
use common::sales::{self, changes};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::page::PageQuery;
use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path, Query};
use crate::purchase::order_inserter::{NewOrder, Stored};
use crate::purchase::{self, CreateOrderRequest, Priced, Purchase};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_order, list_orders))
        .routes(routes!(quote))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
}

pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub(crate) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const MAX_WAIT_SECS: u64 = 30;

/// An order, with its event's name and date.
#[derive(Debug, Serialize, ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    /// When the event starts.
    pub event_date: DateTime<Utc>,
    /// Tickets in the order, over all its lines.
    pub quantity: i32,
    /// Price of one ticket when the order was placed, for an order of one line; `null` for
    /// several lines (see `items`).
    #[schema(value_type = Option<String>, example = "49.90")]
    #[serde(serialize_with = "common::domain::money::serialize_option")]
    pub unit_price: Option<Decimal>,
    /// The sum of the lines (after the promo code's discount).
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub total: Decimal,
    /// The same as `total`, under the name the Go API's clients know.
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub total_amount: Decimal,
    /// ISO 4217 code of the amounts: the event's currency when the order was placed.
    #[schema(example = "EUR")]
    pub currency: String,
    /// The order's lines: so many tickets of one type each, at the prices of the moment the
    /// order was placed.
    #[schema(value_type = Vec<OrderLine>)]
    pub items: sqlx::types::Json<Vec<OrderLine>>,
    /// The promo code the order was placed with, as the organizer wrote it.
    #[schema(example = "EARLYBIRD")]
    pub promo_code: Option<String>,
    /// What the promo code took off the total (`0.00` without one).
    #[schema(value_type = String, example = "10.00")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub discount: Decimal,
    /// `QUEUED` → `PENDING` (tickets held until `expires_at`) → `PAID` (→ `REFUNDED`); or
    /// `REJECTED`, `EXPIRED`, `CANCELLED`.
    pub status: OrderStatus,
    /// Why the order was rejected: `SOLD_OUT` (a type ran out), `VENUE_FULL` (the event's
    /// capacity did), `BUYER_LIMIT`, `PROMO_CODE_REQUIRED`, `PROMO_CODE_USED_UP`,
    /// `PROMO_CODE_BUYER_LIMIT`, `NOT_ON_SALE`, `EVENT_UNAVAILABLE`, or the payment
    /// provider's reason; `FREE_ORDER` on a `PAID` order that cost nothing (paid when its
    /// tickets were allocated, without a payment step); `WAITLIST_OFFER` on a `PENDING` order
    /// made for the buyer's waiting-list entry; `PROVIDER_REFUND`, `ADMIN_REFUND` or
    /// `EVENT_DELETED` on a `REFUNDED` one.
    pub reason: Option<String>,
    /// The ticket type a `SOLD_OUT`, `BUYER_LIMIT`, `PROMO_CODE_REQUIRED` or `NOT_ON_SALE` is
    /// about.
    pub reason_ticket_type_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Until when `PENDING` tickets are held for payment.
    pub expires_at: Option<DateTime<Utc>>,
    /// The order's number in its event's queue: its event's orders are numbered 1, 2, 3…
    /// as they arrive (`null` for orders placed before numbering existed).
    pub queue_number: Option<i64>,
    /// While `QUEUED`: its place in line, 1 being the next of its event's orders to be
    /// decided; `null` once decided.
    #[schema(example = 42)]
    pub queue_position: Option<i64>,
    /// While `QUEUED`: about how many seconds until it is decided, from the event's recent
    /// decision rate; `null` while that rate is unknown, and once decided.
    #[schema(example = 1)]
    pub estimated_wait_secs: Option<i64>,
    /// Placed in the event's pre-sale window and not drawn yet: it has no number or place
    /// until the draw at `sales_start`.
    pub presale_entry: bool,
    /// For an entry not drawn yet: when the draw gives it its place.
    pub sales_start: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Ticket {
    pub id: Uuid,
    pub ticket_type_id: Uuid,
    /// `ACTIVE`, or `CANCELLED` once the order stopped holding it.
    pub status: TicketStatus,
    /// The check-in code (also as a QR image at `/api/v1/tickets/{id}/qr.png`), once the
    /// order is `PAID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// One status an order has had.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusChange {
    pub status: OrderStatus,
    pub reason: Option<String>,
    /// When the order took this status.
    pub at: DateTime<Utc>,
}

/// An order with its tickets and its history.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderDetail {
    #[serde(flatten)]
    pub order: Order,
    pub tickets: Vec<Ticket>,
    /// Every status the order has had, oldest first.
    pub history: Vec<StatusChange>,
}

/// Buy tickets: the order is accepted at once and allocated in the background.
///
/// Answers **202** with the order `QUEUED` and `Location: /api/v1/orders/{id}`; poll that
/// URL (with `?wait=N` to long-poll) or register a webhook endpoint to learn the outcome:
/// `PENDING` (tickets held until `expires_at`, awaiting payment) or `REJECTED` (`SOLD_OUT`,
/// `VENUE_FULL`, `BUYER_LIMIT`, `PROMO_CODE_REQUIRED`, `PROMO_CODE_USED_UP`,
/// `PROMO_CODE_BUYER_LIMIT`, `NOT_ON_SALE`, `EVENT_UNAVAILABLE`). An order's lines are
/// allocated all together or not at all.
///
/// With an `Idempotency-Key` header, a retry with the same key and body returns the same
/// order (its current state, with `Idempotent-Replayed: true`) and buys nothing more; the
/// same key with a different body is refused with 422. Keys are scoped to the caller.
#[utoipa::path(post, path = "/orders", tag = "orders", request_body = CreateOrderRequest,
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters")),
    responses(
        (status = 202, description = "Order accepted (`QUEUED`), or replayed", body = Order,
            headers(("Location" = String, description = "URL of the order"),
                    ("Idempotent-Replayed" = String, description = "`true` when an earlier order was returned"))),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 409, description = "The event has fewer tickets left than asked for (`sold_out`), or its queued \
            orders already ask for more than `QUEUE_DEMAND_FACTOR` (or the event's `queue_demand_factor`) times what \
            is left (`queue_full`, with `tickets_left`, `tickets_queued` and the `waitlist_url` to join instead)",
            body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Neither or both of `quantity` and `items` (`invalid_body`), bad lines \
            (`invalid_items`, `unknown_ticket_type`), no default type for `quantity` (`ticket_type_required`), a \
            type outside its sale window (`not_on_sale`), a quantity out of range (`invalid_quantity`), event \
            over (`event_unavailable`), a promo code that is unknown, withdrawn, outside its window or names none \
            of the types ordered (`invalid_promo_code`), a type sold only with a code naming it ordered without \
            one (`promo_code_required`), or Idempotency-Key reused with another body \
            (`idempotency_key_reused`)",
            body = ErrorBody),
        (status = 503, description = "The order could not be stored; nothing was bought, retry", body = ErrorBody),
    ))]
pub async fn create_order(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    Json(req): Json<CreateOrderRequest>,
) -> Result<(StatusCode, HeaderMap, Json<Order>), ApiError> {
    let result = purchase(state, user, headers, req).await;
    let outcome = match &result {
        Ok((_, headers, _)) if headers.contains_key(IDEMPOTENT_REPLAYED) => "idempotent_replay",
        Ok(_) => "accepted",
        Err(err) if err.code() == "sold_out" => "sold_out",
        Err(err) if err.status().is_server_error() => "unavailable",
        Err(_) => "rejected",
    };
    metrics::counter!("turnstile_purchase_requests_total", "outcome" => outcome).increment(1);
    result
}

async fn purchase(
    state: AppState,
    user: AuthUser,
    headers: HeaderMap,
    req: CreateOrderRequest,
) -> Result<(StatusCode, HeaderMap, Json<Order>), ApiError> {
    let key = idempotency_key(&headers)?;
    let asked = Purchase::parse(&req)?;
    if let Some(key) = &key
        && let Some(existing) = find_by_key(&state, user.id, key).await?
    {
        return replay(existing, &asked);
    }

    let priced = purchase::check(&state, &asked).await?;
    if state.config.sold_out_fast_path {
        let available = purchase::tickets_left(&state, req.event_id, priced.quantity).await?;
        if available < priced.quantity {
            return Err(sold_out(available));
        }
    }

    let order_id = Uuid::now_v7();
    // The request's span (see `routes::request_span`) names the order; its trace goes with
    // the order to the worker and the webhook deliveries.
    let span = tracing::Span::current();
    span.record("order_id", tracing::field::display(order_id));
    let traceparent = common::telemetry::traceparent(&span);
    let unit_price = priced.unit_price();
    let Priced { event, lines, quantity, total, discount, promo_code, presale_entry } = priced;
    let new_order = NewOrder {
        id: order_id,
        user_id: user.id,
        event_id: req.event_id,
        quantity,
        unit_price,
        total,
        currency: event.currency.clone(),
        lines: lines.clone(),
        promo_code: promo_code.clone(),
        discount,
        idempotency_key: key.clone(),
        traceparent,
        presale_entry,
    };
    let placed = match store(&state, new_order, event.sales_start.is_some()).await? {
        Stored::Inserted(placed) => placed,
        // The same key raced in from a concurrent request: answer like a replay.
        Stored::KeyTaken => {
            let key = key.as_ref().ok_or(ApiError::Unavailable)?;
            let existing = find_by_key(&state, user.id, key).await?.ok_or(ApiError::Unavailable)?;
            return replay(existing, &asked);
        }
        Stored::EntryTaken => return Err(entry_taken(&state, user.id, key.as_ref(), &asked).await?),
        Stored::QueueFull { queued, left } => return Err(ApiError::QueueFull { event_id: req.event_id, left, queued }),
        Stored::DrawPending => return Err(ApiError::Unavailable),
    };

    let order = Order {
        id: order_id,
        event_id: req.event_id,
        event_name: event.name,
        event_date: event.starts_at,
        quantity,
        unit_price,
        total,
        total_amount: total,
        currency: event.currency,
        items: sqlx::types::Json(lines),
        promo_code: promo_code.map(|(_, code)| code),
        discount,
        status: OrderStatus::Queued,
        reason: None,
        reason_ticket_type_id: None,
        created_at: placed.created_at,
        updated_at: placed.updated_at,
        expires_at: None,
        queue_number: placed.queue_number,
        queue_position: placed.queue_position,
        estimated_wait_secs: placed.estimated_wait_secs,
        presale_entry: placed.presale_entry,
        sales_start: event.sales_start.filter(|_| placed.presale_entry),
    };
    Ok((StatusCode::ACCEPTED, location(order_id), Json(order)))
}

/// Stores the order. One that arrives after the opening of a pre-sale whose draw has not
/// happened yet runs the draw first (exactly once whoever runs it: `sales::draw`) and is
/// then stored behind the drawn entries; should the database's clock say the opening has
/// not come after all, it is stored as an entry. `may_wait_for_draw`: the event has a
/// `sales_start` (only then is the order kept for a second try).
async fn store(state: &AppState, order: NewOrder, may_wait_for_draw: bool) -> Result<Stored, ApiError> {
    if !may_wait_for_draw {
        return Ok(state.orders.insert(order).await?);
    }
    let mut order = order;
    for _ in 0..3 {
        match state.orders.insert(order.clone()).await? {
            Stored::DrawPending => {
                let drawn = sales::draw::draw_and_send(&state.db, &state.publisher, order.event_id).await?;
                if drawn == sales::draw::Drawn::NotYet {
                    order.presale_entry = true;
                }
            }
            stored => return Ok(stored),
        }
    }
    Ok(Stored::DrawPending)
}

/// A pre-sale entry refused by the one-open-entry rule: `409 already_queued` with the open
/// entry, or, when it was the `Idempotency-Key` that a concurrent request took, a replay's
/// refusal if the bodies differ (an identical replay is answered by the caller's first check).
async fn entry_taken(
    state: &AppState,
    user_id: Uuid,
    key: Option<&IdempotencyKey>,
    asked: &Purchase,
) -> Result<ApiError, ApiError> {
    let open = sqlx::query_scalar!(
        "SELECT id FROM orders
         WHERE event_id = $1 AND user_id = $2 AND presale_entry AND queue_number IS NULL AND status = 'QUEUED'",
        asked.event_id,
        user_id
    )
    .fetch_optional(&state.db)
    .await?;
    if let Some(order_id) = open {
        return Ok(ApiError::AlreadyQueued { order_id });
    }
    if let Some(key) = key
        && let Some(existing) = find_by_key(state, user_id, key).await?
    {
        return Ok(replay(existing, asked).err().unwrap_or(ApiError::Unavailable));
    }
    Ok(ApiError::Unavailable)
}

/// What an order would cost, without buying: the same checks as `POST /orders`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Quote {
    pub event_id: Uuid,
    pub quantity: i32,
    /// For an order of one line; `null` for several.
    #[schema(value_type = Option<String>, example = "49.90")]
    #[serde(serialize_with = "common::domain::money::serialize_option")]
    pub unit_price: Option<Decimal>,
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub total: Decimal,
    /// ISO 4217 code of the amounts.
    #[schema(example = "EUR")]
    pub currency: String,
    pub items: Vec<OrderLine>,
    /// The promo code applied, as the organizer wrote it.
    pub promo_code: Option<String>,
    /// What the promo code takes off the total.
    #[schema(value_type = String, example = "10.00")]
    #[serde(serialize_with = "common::domain::money::serialize")]
    pub discount: Decimal,
}

/// Price a purchase without making it: the body of `POST /orders`, the same checks (the
/// event exists and is on sale, the types are on sale, the quantities are within their
/// limits), the prices it would be bought at now. Nothing is stored or reserved; whether
/// tickets are left is not said (the purchase itself decides that).
#[utoipa::path(post, path = "/orders/quote", tag = "orders", request_body = CreateOrderRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "What the purchase would cost now", body = Quote),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 422, description = "Quantity out of range (`invalid_quantity`), bad lines (`invalid_items`, \
            `unknown_ticket_type`, `ticket_type_required`), a type outside its sale window (`not_on_sale`), \
            event over (`event_unavailable`), or a promo code that cannot be used (`invalid_promo_code`, \
            `promo_code_required`)",
            body = ErrorBody),
    ))]
pub async fn quote(
    State(state): State<AppState>,
    _user: AuthUser,
    Json(req): Json<CreateOrderRequest>,
) -> Result<Json<Quote>, ApiError> {
    let priced = purchase::check(&state, &Purchase::parse(&req)?).await?;
    let unit_price = priced.unit_price();
    let Priced { event, lines, quantity, total, discount, promo_code, .. } = priced;
    Ok(Json(Quote {
        event_id: req.event_id,
        quantity,
        unit_price,
        total,
        currency: event.currency,
        items: lines,
        promo_code: promo_code.map(|(_, code)| code),
        discount,
    }))
}

/// The fast path's refusal: fewer tickets left than asked for.
fn sold_out(available: i32) -> ApiError {
    let message = match available {
        ..=0 => "the event is sold out".to_owned(),
        left => format!("only {left} tickets are left"),
    };
    ApiError::conflict("sold_out", message)
}

fn location(order_id: Uuid) -> HeaderMap {
    super::location(&format!("/api/v1/orders/{order_id}"))
}

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII characters.
/// A malformed header is a 400, like other malformed requests.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    IdempotencyKey::parse(value.as_bytes())
        .map(Some)
        .map_err(|refusal| ApiError::BadRequest { code: refusal.code, message: refusal.message })
}

async fn find_by_key(state: &AppState, user_id: Uuid, key: &IdempotencyKey) -> Result<Option<Order>, ApiError> {
    Ok(sqlx::query_as!(
        Order,
        r#"SELECT o.id, o.event_id, e.name AS event_name, e.starts_at AS event_date, o.quantity, o.unit_price,
                  o.total, o.total AS "total_amount!", o.currency, o.lines AS "items: sqlx::types::Json<Vec<OrderLine>>",
                  o.promo_code, o.discount, o.status AS "status: OrderStatus", o.reason, o.reason_ticket_type_id,
                  o.created_at, o.updated_at, o.expires_at, o.queue_number,
                  queue_position(o.status, o.queue_number, e.queue_decided) AS queue_position,
                  queue_wait_secs(o.status, o.queue_number, e.queue_decided, e.queue_rate) AS estimated_wait_secs,
                  o.presale_entry AND o.queue_number IS NULL AS "presale_entry!",
                  CASE WHEN o.presale_entry AND o.queue_number IS NULL THEN e.sales_start END AS sales_start
           FROM orders o JOIN events e ON e.id = o.event_id WHERE o.user_id = $1 AND o.idempotency_key = $2"#,
        user_id,
        key.as_str()
    )
    .fetch_optional(&state.db)
    .await?)
}

fn replay(existing: Order, asked: &Purchase) -> Result<(StatusCode, HeaderMap, Json<Order>), ApiError> {
    if !asked.asks_for(existing.event_id, &existing.items, existing.quantity, existing.promo_code.as_deref()) {
        return Err(ApiError::invalid(
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request; use a new key for a new purchase",
        ));
    }
    let mut headers = location(existing.id);
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Ok((StatusCode::ACCEPTED, headers, Json(existing)))
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/orders", tag = "orders", params(PageQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of the caller's orders", body = [Order],
            headers(("Link" = String, description = "`<url>; rel=\"next\"` when more follow"),
                    ("X-Next-Cursor" = String, description = "Cursor of the next page, when more follow"))),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ))]
pub async fn list_orders(
    State(state): State<AppState>,
    user: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<Order>>), ApiError> {
    let limit = query.limit()?;
    let mut orders = sqlx::query_as!(
        Order,
        r#"SELECT o.id, o.event_id, e.name AS event_name, e.starts_at AS event_date, o.quantity, o.unit_price,
                  o.total, o.total AS "total_amount!", o.currency, o.lines AS "items: sqlx::types::Json<Vec<OrderLine>>",
                  o.promo_code, o.discount, o.status AS "status: OrderStatus", o.reason, o.reason_ticket_type_id,
                  o.created_at, o.updated_at, o.expires_at, o.queue_number,
                  queue_position(o.status, o.queue_number, e.queue_decided) AS queue_position,
                  queue_wait_secs(o.status, o.queue_number, e.queue_decided, e.queue_rate) AS estimated_wait_secs,
                  o.presale_entry AND o.queue_number IS NULL AS "presale_entry!",
                  CASE WHEN o.presale_entry AND o.queue_number IS NULL THEN e.sales_start END AS sales_start
           FROM orders o JOIN events e ON e.id = o.event_id
           WHERE o.user_id = $1 AND ($2::uuid IS NULL OR o.id < $2)
           ORDER BY o.id DESC
           LIMIT $3"#,
        user.id,
        query.cursor,
        limit + 1
    )
    .fetch_all(&state.db)
    .await?;
    let headers = query.finish("/api/v1/orders", &mut orders, |order| order.id);
    Ok((headers, Json(orders)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Long-poll: wait up to this many seconds (0 to 30) for the status to change from what
    /// it is when the request arrives (or from `status`). Returns at once if the order is
    /// final.
    #[param(minimum = 0, maximum = 30)]
    pub wait: Option<u64>,
    /// With `wait`: the status the client last saw (e.g. `QUEUED`). The answer comes as
    /// soon as the order's status is another one, at once if it already is, so a change
    /// between two requests is never waited through.
    pub status: Option<OrderStatus>,
}

/// One order with its tickets and history (its owner, or an admin; anyone else gets 404).
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Order id"), WaitQuery),
    responses(
        (status = 200, description = "The order", body = OrderDetail),
        (status = 400, description = "Bad query string (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such order, or not the caller's", body = ErrorBody),
    ))]
pub async fn get_order(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<Uuid>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<OrderDetail>, ApiError> {
    let wait = query.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::invalid_query(format!("wait must be between 0 and {MAX_WAIT_SECS} seconds")));
    }
    let order = load_visible(&state, user, id).await?;
    let seen = query.status.unwrap_or(order.status);
    let order = if wait > 0 && !order.status.is_final() && order.status == seen {
        let _waiting = crate::observability::LongPoll::start();
        wait_for_change(&state, user, order, Duration::from_secs(wait)).await?
    } else {
        order
    };
    Ok(Json(detail(&state, order).await?))
}

async fn detail(state: &AppState, order: Order) -> Result<OrderDetail, ApiError> {
    // `code` is derived from the ticket's id below, never stored.
    let mut tickets = sqlx::query_as!(
        Ticket,
        r#"SELECT id, ticket_type_id, status AS "status: TicketStatus", NULL::text AS code
           FROM tickets WHERE order_id = $1 ORDER BY id"#,
        order.id
    )
    .fetch_all(&state.db)
    .await?;
    if order.status == OrderStatus::Paid {
        for ticket in tickets.iter_mut().filter(|t| t.status == TicketStatus::Active) {
            ticket.code = Some(state.ticket_codes.code(ticket.id));
        }
    }
    let history = sqlx::query_as!(
        StatusChange,
        r#"SELECT status AS "status!: OrderStatus", reason, at AS "at!" FROM order_status_changes WHERE order_id = $1 ORDER BY id"#,
        order.id
    )
    .fetch_all(&state.db)
    .await?;
    Ok(OrderDetail { order, tickets, history })
}

/// Cancel a `PENDING` order (its owner only): its tickets are released at once for other
/// buyers. A pre-sale entry can be cancelled (withdrawn from the draw) until the draw.
/// Cancelling a cancelled order again answers 200 as well.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, description = "The order, `CANCELLED`", body = OrderDetail),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such order, or not the caller's", body = ErrorBody),
        (status = 409, description = "Not `PENDING` (nor a pre-sale entry before its draw): `QUEUED`, or already \
            final (`invalid_transition`, with `current_status`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; nothing changed, retry", body = ErrorBody),
    ))]
pub async fn cancel_order(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<Json<OrderDetail>, ApiError> {
    let mut tx = state.db.begin().await?;
    let mut locked = changes::lock(&mut tx, id, Some(user.id)).await?.ok_or(ApiError::NotFound("order"))?;
    let offer_ttl = state.config.waitlist.offer_ttl();
    let transition = if locked.order.status == OrderStatus::Queued {
        sales::draw::withdraw_entry(&mut locked).await?
    } else {
        changes::apply(&mut locked, OrderTrigger::CancelledByOwner, None, offer_ttl).await?
    };
    let current = locked.order.status;
    // Committed whatever the outcome: a hold found over was expired on the way.
    tx.commit().await?;
    if transition == Transition::Impossible {
        return Err(ApiError::InvalidTransition { current, target: "CANCELLED" });
    }
    let order = load_visible(&state, user, id).await?;
    Ok(Json(detail(&state, order).await?))
}

async fn load_visible(state: &AppState, user: AuthUser, id: Uuid) -> Result<Order, ApiError> {
    sqlx::query_as!(
        Order,
        r#"SELECT o.id, o.event_id, e.name AS event_name, e.starts_at AS event_date, o.quantity, o.unit_price,
                  o.total, o.total AS "total_amount!", o.currency, o.lines AS "items: sqlx::types::Json<Vec<OrderLine>>",
                  o.promo_code, o.discount, o.status AS "status: OrderStatus", o.reason, o.reason_ticket_type_id,
                  o.created_at, o.updated_at, o.expires_at, o.queue_number,
                  queue_position(o.status, o.queue_number, e.queue_decided) AS queue_position,
                  queue_wait_secs(o.status, o.queue_number, e.queue_decided, e.queue_rate) AS estimated_wait_secs,
                  o.presale_entry AND o.queue_number IS NULL AS "presale_entry!",
                  CASE WHEN o.presale_entry AND o.queue_number IS NULL THEN e.sales_start END AS sales_start
           FROM orders o JOIN events e ON e.id = o.event_id WHERE o.id = $1 AND (o.user_id = $2 OR $3)"#,
        id,
        user.id,
        user.is_admin()
    )
    .fetch_optional(&state.db)
    .await?
    .ok_or(ApiError::NotFound("order"))
}

/// Waits until the order's status differs from `initial`'s, or `wait` passes. Woken by the
/// worker's `NOTIFY`; re-reads at least every second in case a notification was missed.
async fn wait_for_change(state: &AppState, user: AuthUser, initial: Order, wait: Duration) -> Result<Order, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let waiter = state.order_watch.watch(initial.id);
    loop {
        // Armed before the read, so a change committed after the read still wakes us.
        let notified = waiter.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let current = load_visible(state, user, initial.id).await?;
        let now = tokio::time::Instant::now();
        if current.status != initial.status || now >= deadline {
            return Ok(current);
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep((deadline - now).min(Duration::from_secs(1))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(key).unwrap());
        headers
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        assert_eq!(idempotency_key(&headers(b"order-42")).unwrap().unwrap().as_str(), "order-42");
        assert!(idempotency_key(&headers(b"has space")).is_err());
        assert!(idempotency_key(&headers(&[b'k'; 256])).is_err());
        assert!(idempotency_key(&headers(b"caf\xc3\xa9")).is_err());
    }
}
