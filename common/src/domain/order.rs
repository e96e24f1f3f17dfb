//! An order's life: its status and the reasons it can be turned down.

use serde::{Deserialize, Serialize};

/// Where an order stands. Stored as upper-case text under a CHECK constraint.
///
/// `QUEUED` (accepted, waiting for the worker) → `PENDING` (tickets held, awaiting payment)
/// → `PAID`; or `REJECTED`, `EXPIRED`, `CANCELLED`. The last four, and `PAID`, are final
/// as far as allocation is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Queued,
    Pending,
    Paid,
    Rejected,
    Expired,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Pending => "PENDING",
            Self::Paid => "PAID",
            Self::Rejected => "REJECTED",
            Self::Expired => "EXPIRED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Whether no further change can happen to an order in this status.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Pending)
    }
}

/// Why the worker turned an order down (`reason` of a `REJECTED` order).
pub mod reason {
    /// Fewer tickets were left than the order asked for.
    pub const SOLD_OUT: &str = "SOLD_OUT";
    /// The event was deleted or had started by the time the order was processed.
    pub const EVENT_UNAVAILABLE: &str = "EVENT_UNAVAILABLE";
}

#[cfg(test)]
mod tests {
    use super::OrderStatus;

    #[test]
    fn serialises_as_stored() {
        for status in [
            OrderStatus::Queued,
            OrderStatus::Pending,
            OrderStatus::Paid,
            OrderStatus::Rejected,
            OrderStatus::Expired,
            OrderStatus::Cancelled,
        ] {
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{}\"", status.as_str()));
        }
        assert!(OrderStatus::Paid.is_final() && !OrderStatus::Pending.is_final() && !OrderStatus::Queued.is_final());
    }
}
