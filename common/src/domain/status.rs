//! The statuses of tickets, webhook deliveries and waiting-list entries. Each is stored as
//! text under a CHECK constraint that lists exactly these values; the order's own status,
//! with its state machine, is [`super::OrderStatus`].

use serde::{Deserialize, Serialize};

/// A ticket is `ACTIVE` while its order holds it (`PENDING` or `PAID`), `CANCELLED` once the
/// order stopped holding it (expired, cancelled, refunded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TicketStatus {
    Active,
    Cancelled,
}

/// Where one webhook delivery stands: `PENDING` (due, or waiting for its next attempt),
/// `SUCCEEDED`, `FAILED` (attempts used up) or `ABANDONED` (the endpoint is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    Pending,
    Succeeded,
    Failed,
    Abandoned,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Abandoned => "ABANDONED",
        }
    }
}

/// A waiting-list entry: `WAITING` in line, `OFFERED` a held order, then `PURCHASED` (paid),
/// `LAPSED` (the offer expired or was cancelled), `LEFT` (the buyer left the list) or
/// `CLOSED` (the event was deleted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WaitlistStatus {
    Waiting,
    Offered,
    Purchased,
    Lapsed,
    Left,
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn travel_as_the_texts_the_check_constraints_list() {
        assert_eq!(serde_json::to_string(&TicketStatus::Active).unwrap(), "\"ACTIVE\"");
        assert_eq!(serde_json::to_string(&DeliveryStatus::Abandoned).unwrap(), "\"ABANDONED\"");
        assert_eq!(serde_json::from_str::<WaitlistStatus>("\"OFFERED\"").unwrap(), WaitlistStatus::Offered);
        assert!(serde_json::from_str::<TicketStatus>("\"active\"").is_err());
        use DeliveryStatus::*;
        for status in [Pending, Succeeded, Failed, Abandoned] {
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{}\"", status.as_str()));
        }
    }
}
