//! The order event other systems consume, in one JSON shape whether it comes from the
//! `orders.events` exchange (routing key `order.<status>`) or a webhook delivery:
//!
//! ```json
//! {"type": "order.paid", "version": 1, "id": "evt_1234", "timestamp": "…",
//!  "data": {"id": "…", "user_id": "…", "event_id": "…", "quantity": 2, "unit_price": "49.90",
//!           "total": "99.80", "currency": "EUR", "promo_code": null, "discount": "0.00",
//!           "items": [{"ticket_type_id": "…", "name": "General admission", "quantity": 2, "unit_price": "49.90"}],
//!           "status": "PAID", "reason": null, "reason_ticket_type_id": null, "created_at": "…",
//!           "expires_at": "…", "queue_number": 42}}
//! ```
//!
//! `id` is unique per status change (the same on a re-publish, so consumers can drop
//! duplicates); `timestamp` is when the order took the status. Fields may be added within a
//! version; a change that breaks consumers bumps `version`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::domain::{OrderLine, OrderStatus};

/// The version of the event's shape.
pub const VERSION: u32 = 1;

/// The version of an `orders.events` message that carries several events of one type:
/// `{"version": 2, "type": "order.paid", "events": [<version 1 event>, …]}`.
pub const BATCH_VERSION: u32 = 2;

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OrderNotification {
    /// `order.queued`, `order.pending`, `order.paid`, `order.rejected`, `order.expired`,
    /// `order.cancelled` or `order.refunded`; also the routing key on `orders.events`. A
    /// waiting-list offer is an `order.pending` with `reason` `WAITLIST_OFFER`.
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    /// `evt_<n>`: unique per status change.
    pub id: String,
    /// When the order took this status.
    pub timestamp: DateTime<Utc>,
    pub data: OrderSnapshot,
}

/// The order as of the status change.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OrderSnapshot {
    pub id: Uuid,
    pub user_id: Uuid,
    pub event_id: Uuid,
    /// Tickets over all lines.
    pub quantity: i32,
    /// For an order of one line; `null` for several.
    #[schema(value_type = Option<String>, example = "49.90")]
    #[serde(serialize_with = "crate::domain::money::serialize_option")]
    pub unit_price: Option<Decimal>,
    #[schema(value_type = String, example = "99.80")]
    #[serde(serialize_with = "crate::domain::money::serialize")]
    pub total: Decimal,
    /// ISO 4217 code of the amounts.
    #[schema(example = "EUR")]
    pub currency: String,
    /// The order's lines, at the prices of the moment it was placed: passed on as stored
    /// (`orders.lines`, written from [`OrderLine`]s), without being read and written again.
    #[schema(value_type = Vec<OrderLine>)]
    pub items: Box<RawValue>,
    /// The promo code the order was placed with, as the organizer wrote it.
    pub promo_code: Option<String>,
    /// What the promo code took off the total (`0.00` without one).
    #[schema(value_type = String, example = "0.00")]
    #[serde(serialize_with = "crate::domain::money::serialize")]
    pub discount: Decimal,
    pub status: OrderStatus,
    pub reason: Option<String>,
    /// On `order.rejected`: the ticket type the reason is about, when there is one.
    pub reason_ticket_type_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// Until when `PENDING` tickets are held.
    pub expires_at: Option<DateTime<Utc>>,
    /// The order's number in its event's queue (1, 2, 3… as its event's orders arrived).
    pub queue_number: Option<i64>,
}

/// The event type (and routing key) of a status: `order.<status in lower case>`.
pub fn event_type(status: OrderStatus) -> String {
    format!("order.{}", status.as_str().to_ascii_lowercase())
}

impl OrderNotification {
    pub fn new(history_id: i64, timestamp: DateTime<Utc>, data: OrderSnapshot) -> Self {
        Self { kind: event_type(data.status), version: VERSION, id: format!("evt_{history_id}"), timestamp, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_lower_case_statuses() {
        let types: Vec<String> = OrderStatus::ALL.into_iter().map(event_type).collect();
        assert_eq!(
            types,
            [
                "order.queued",
                "order.pending",
                "order.paid",
                "order.rejected",
                "order.expired",
                "order.cancelled",
                "order.refunded"
            ]
        );
    }
}
