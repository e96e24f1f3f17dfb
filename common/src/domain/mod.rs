//! Domain types that carry their rules: a value of one of these types is valid by
//! construction, so handlers parse input into them at the edge and never re-check.

pub mod currency;
mod email;
pub mod money;
mod order;
mod order_line;
mod role;
mod status;
pub mod text;

pub use currency::Currency;
pub use email::Email;
pub use order::{OrderEvent, OrderStatus, Transition, reason};
pub use order_line::OrderLine;
pub use role::Role;
pub use status::{DeliveryStatus, TicketStatus, WaitlistStatus};
