//! Domain types that carry their rules: a value of one of these types is valid by
//! construction, so handlers parse input into them at the edge and never re-check.

mod account;
pub mod currency;
mod email;
mod idempotency_key;
pub mod money;
mod order;
mod order_line;
mod role;
mod status;
pub mod text;

pub use account::{Password, UserName};
pub use currency::Currency;
pub use email::Email;
pub use idempotency_key::IdempotencyKey;
pub use order::{OrderStatus, OrderTrigger, Transition, reason};
pub use order_line::OrderLine;
pub use role::Role;
pub use status::{DeliveryStatus, TicketStatus, WaitlistStatus};

/// Why an input was refused: a stable code for programs and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}
