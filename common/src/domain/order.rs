//! An order's life: its status and the reasons it can be turned down.

use serde::{Deserialize, Serialize};

/// Where an order stands. Stored as upper-case text under a CHECK constraint.
///
/// `QUEUED` (accepted, waiting for the worker) → `PENDING` (tickets held, awaiting payment)
/// → `PAID` (→ `REFUNDED`); or `REJECTED`, `EXPIRED`, `CANCELLED`. All but `QUEUED` and
/// `PENDING` are final as far as allocation is concerned; `PAID` can still be refunded.
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
    Refunded,
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
            Self::Refunded => "REFUNDED",
        }
    }

    /// Whether no further change can happen to an order in this status.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Pending)
    }
}

/// What can happen to an order. Every status change in the system goes through
/// [`OrderStatus::apply`], so the rules live in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderTrigger {
    /// The worker found tickets for it.
    Allocated,
    /// The worker found tickets for an order that costs nothing: there is nothing to pay,
    /// so it is paid at once (reason `FREE_ORDER`).
    AllocatedFree,
    /// The worker could not (sold out, event unavailable).
    AllocationRejected,
    /// The payment provider confirmed payment.
    PaymentSucceeded,
    /// The payment provider declined payment.
    PaymentFailed,
    /// The hold ran out before payment.
    HoldExpired,
    /// Its owner cancelled it.
    CancelledByOwner,
    /// Its event was deleted (withdrawn from sale) before the order was paid.
    EventWithdrawn,
    /// Its owner withdrew it from its event's pre-sale queue before the draw.
    EntryWithdrawn,
    /// A paid order's money went back (the payment provider reported it, an admin asked for
    /// it, or its event was deleted with refunds).
    Refunded,
}

impl OrderTrigger {
    pub const ALL: [OrderTrigger; 10] = [
        Self::Allocated,
        Self::AllocatedFree,
        Self::AllocationRejected,
        Self::PaymentSucceeded,
        Self::PaymentFailed,
        Self::HoldExpired,
        Self::CancelledByOwner,
        Self::EventWithdrawn,
        Self::EntryWithdrawn,
        Self::Refunded,
    ];

    /// The status this trigger leads to.
    pub fn target(self) -> OrderStatus {
        match self {
            Self::Allocated => OrderStatus::Pending,
            Self::AllocationRejected | Self::PaymentFailed | Self::EventWithdrawn => OrderStatus::Rejected,
            Self::PaymentSucceeded | Self::AllocatedFree => OrderStatus::Paid,
            Self::HoldExpired => OrderStatus::Expired,
            Self::CancelledByOwner | Self::EntryWithdrawn => OrderStatus::Cancelled,
            Self::Refunded => OrderStatus::Refunded,
        }
    }
}

/// The outcome of applying an [`OrderTrigger`] to an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The order moves to this status. `releases_tickets`: it leaves `PENDING` for
    /// something other than `PAID`, or `PAID` for `REFUNDED`, so its tickets are cancelled
    /// and `sold` goes down in the same transaction.
    Moves { to: OrderStatus, releases_tickets: bool },
    /// The order is already where the trigger leads (a retried webhook): nothing to do.
    AlreadyThere,
    /// Not allowed from the current status (e.g. paying an expired order).
    Impossible,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] =
        [Self::Queued, Self::Pending, Self::Paid, Self::Rejected, Self::Expired, Self::Cancelled, Self::Refunded];

    /// The state machine: `QUEUED → PENDING → PAID`; `QUEUED → PAID` (free orders);
    /// `QUEUED → REJECTED`; `QUEUED → CANCELLED` (a pre-sale entry withdrawn before its draw);
    /// `PENDING → REJECTED | EXPIRED | CANCELLED`; `PAID → REFUNDED`; other final states
    /// never change. An event's deletion rejects its unpaid orders (`QUEUED` or `PENDING`).
    /// Only `PENDING` and `PAID` hold tickets, so leaving them for anything but `PAID`
    /// releases them.
    pub fn apply(self, trigger: OrderTrigger) -> Transition {
        use OrderStatus as S;
        use OrderTrigger as T;
        let allowed = matches!(
            (self, trigger),
            (
                S::Queued,
                T::Allocated | T::AllocatedFree | T::AllocationRejected | T::EventWithdrawn | T::EntryWithdrawn
            ) | (
                S::Pending,
                T::PaymentSucceeded | T::PaymentFailed | T::HoldExpired | T::CancelledByOwner | T::EventWithdrawn
            ) | (S::Paid, T::Refunded)
        );
        if allowed {
            let to = trigger.target();
            let held = matches!(self, S::Pending | S::Paid);
            Transition::Moves { to, releases_tickets: held && to != S::Paid }
        } else if self == trigger.target() {
            Transition::AlreadyThere
        } else {
            Transition::Impossible
        }
    }
}

/// Why an order ended as it did: the `reason` of a `REJECTED` order, and of a `PAID` one
/// that had nothing to pay.
pub mod reason {
    /// Fewer tickets of a type were left than the order asked for (the order's
    /// `reason_ticket_type_id` names the type). A type without stock of its own is sold out
    /// when the venue is full.
    pub const SOLD_OUT: &str = "SOLD_OUT";
    /// Every line's type had the tickets, but the event's capacity (the venue cap over all
    /// types) had fewer left than the order's total.
    pub const VENUE_FULL: &str = "VENUE_FULL";
    /// The buyer would hold more tickets of the event (or of the named type) than its
    /// `max_per_buyer` allows, counting their `PENDING` and `PAID` orders.
    pub const BUYER_LIMIT: &str = "BUYER_LIMIT";
    /// The named type is sold only with a promo code that names it, and the order carries
    /// none (the type came to require one after the order was accepted).
    pub const PROMO_CODE_REQUIRED: &str = "PROMO_CODE_REQUIRED";
    /// The order's promo code has fewer uses left (`max_uses`, counting the tickets held or
    /// paid under it) than the order's tickets under it.
    pub const PROMO_CODE_USED_UP: &str = "PROMO_CODE_USED_UP";
    /// The buyer would hold more tickets under the order's promo code than its
    /// `max_uses_per_buyer` allows.
    pub const PROMO_CODE_BUYER_LIMIT: &str = "PROMO_CODE_BUYER_LIMIT";
    /// The order arrived outside the named type's sale window, or the type was withdrawn.
    pub const NOT_ON_SALE: &str = "NOT_ON_SALE";
    /// The event was deleted or had started by the time the order was processed.
    pub const EVENT_UNAVAILABLE: &str = "EVENT_UNAVAILABLE";
    /// The payment provider declined payment and gave no reason of its own.
    pub const PAYMENT_DECLINED: &str = "PAYMENT_DECLINED";
    /// A `PAID` order that cost nothing: paid when its tickets were allocated, without a
    /// payment.
    pub const FREE_ORDER: &str = "FREE_ORDER";
    /// A `PENDING` order made for a waiting-list entry from released tickets: an offer, held
    /// for `WAITLIST_OFFER_TTL_SECS`.
    pub const WAITLIST_OFFER: &str = "WAITLIST_OFFER";
    /// A `REFUNDED` order: the payment provider reported the refund.
    pub const PROVIDER_REFUND: &str = "PROVIDER_REFUND";
    /// A `REFUNDED` order: an admin refunded it (`POST /orders/{id}/refund`).
    pub const ADMIN_REFUND: &str = "ADMIN_REFUND";
    /// A `REFUNDED` order: its event was deleted with `?refund=true`.
    pub const EVENT_DELETED: &str = "EVENT_DELETED";
}

#[cfg(test)]
mod tests {
    use super::{OrderStatus, OrderTrigger, Transition};

    /// Every (status, event) pair, spelled out: the table is the specification.
    #[test]
    fn every_transition() {
        use OrderStatus as S;
        let moves = |to, releases_tickets| Transition::Moves { to, releases_tickets };
        let same = Transition::AlreadyThere;
        let no = Transition::Impossible;
        #[rustfmt::skip]
        let table = [
            // event:            Allocated              AllocatedFree          AllocationRejected      PaymentSucceeded   PaymentFailed            HoldExpired              CancelledByOwner          EventWithdrawn            EntryWithdrawn              Refunded
            (S::Queued,    [moves(S::Pending, false), moves(S::Paid, false), moves(S::Rejected, false), no,                no,                      no,                      no,                       moves(S::Rejected, false), moves(S::Cancelled, false), no]),
            (S::Pending,   [same,                     no,                    no,                        moves(S::Paid, false), moves(S::Rejected, true), moves(S::Expired, true), moves(S::Cancelled, true), moves(S::Rejected, true), no,                         no]),
            (S::Paid,      [no,                       same,                  no,                        same,              no,                      no,                      no,                       no,                       no,                         moves(S::Refunded, true)]),
            (S::Rejected,  [no,                       no,                    same,                      no,                same,                    no,                      no,                       same,                     no,                         no]),
            (S::Expired,   [no,                       no,                    no,                        no,                no,                      same,                    no,                       no,                       no,                         no]),
            (S::Cancelled, [no,                       no,                    no,                        no,                no,                      no,                      same,                     no,                       same,                       no]),
            (S::Refunded,  [no,                       no,                    no,                        no,                no,                      no,                      no,                       no,                       no,                         same]),
        ];
        assert_eq!(table.len(), OrderStatus::ALL.len());
        for (status, outcomes) in table {
            for (trigger, expected) in OrderTrigger::ALL.into_iter().zip(outcomes) {
                assert_eq!(status.apply(trigger), expected, "{status:?} + {trigger:?}");
            }
        }
    }

    #[test]
    fn final_states_never_move_but_paid_is_refunded() {
        for status in OrderStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for trigger in OrderTrigger::ALL {
                let refund = status == OrderStatus::Paid && trigger == OrderTrigger::Refunded;
                assert_eq!(
                    matches!(status.apply(trigger), Transition::Moves { .. }),
                    refund,
                    "{status:?} on {trigger:?}"
                );
            }
        }
    }

    #[test]
    fn serialises_as_stored() {
        for status in OrderStatus::ALL {
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{}\"", status.as_str()));
        }
        assert!(OrderStatus::Paid.is_final() && !OrderStatus::Pending.is_final() && !OrderStatus::Queued.is_final());
    }
}
