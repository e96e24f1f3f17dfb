//! The rules a purchase passes before it is stored, pure: its shape ([`Purchase::parse`],
//! checked once per request), then its lines against the event as the catalogue has it
//! ([`price`]): the event exists and is on sale, each line's type exists and is in its sale
//! window, the quantities are within the per-order limits and could ever fit the buyer caps
//! (whether the buyer's earlier orders leave room is the worker's to decide, under the
//! event's lock). The waiting list's joins pass the same rules.

use chrono::{DateTime, Utc};
use common::domain::OrderLine;
use rust_decimal::Decimal;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::catalog::{EventForSale, TypeForSale};
use crate::error::ApiError;

/// What to buy: `items` (tickets of one or more types), or `quantity` alone (the seed's
/// shape: that many tickets of the event's default type, "General admission" unless the
/// organizer changed it).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    pub event_id: Uuid,
    /// Number of tickets of the event's default type, 1 to the event's `max_per_order`.
    /// Not with `items`.
    #[schema(minimum = 1, example = 2)]
    pub quantity: Option<i64>,
    /// One line per ticket type, each type once, at most 20 lines; all of them are
    /// allocated or none. Not with `quantity`.
    #[schema(max_items = 20)]
    pub items: Option<Vec<OrderItem>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub ticket_type_id: Uuid,
    /// Tickets of this type, 1 to the type's `max_per_order`.
    #[schema(minimum = 1, example = 2)]
    pub quantity: i64,
}

/// The most lines one order may have.
pub const MAX_LINES: usize = 20;

/// A purchase request of a valid shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    pub event_id: Uuid,
    wanted: Wanted,
}

/// The tickets asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Wanted {
    /// That many of the event's default type.
    Default(i64),
    /// (type, quantity) per line: each type once, each quantity at least 1.
    Items(Vec<(Uuid, i64)>),
}

impl Purchase {
    /// The checks of the request's shape, before anything is read: `quantity` or `items`,
    /// not both; quantities at least 1; at most [`MAX_LINES`] lines, each type once.
    pub fn parse(req: &CreateOrderRequest) -> Result<Self, ApiError> {
        let items = |message: &str| ApiError::invalid("invalid_items", message.to_owned());
        let wanted = match (req.quantity, &req.items) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid("invalid_body", "give either quantity or items, not both"));
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "invalid_body",
                    "quantity (tickets of the event's default type) or items is required",
                ));
            }
            (Some(quantity), None) if quantity < 1 => {
                return Err(ApiError::invalid("invalid_quantity", "quantity must be at least 1"));
            }
            (Some(quantity), None) => Wanted::Default(quantity),
            (None, Some(lines)) => {
                if lines.is_empty() || lines.len() > MAX_LINES {
                    return Err(items(&format!("items must have 1 to {MAX_LINES} lines")));
                }
                if lines.iter().any(|line| line.quantity < 1) {
                    return Err(ApiError::invalid("invalid_quantity", "each line's quantity must be at least 1"));
                }
                let mut types: Vec<Uuid> = lines.iter().map(|line| line.ticket_type_id).collect();
                types.sort();
                types.dedup();
                if types.len() != lines.len() {
                    return Err(items("each ticket type may appear in one line only"));
                }
                Wanted::Items(lines.iter().map(|line| (line.ticket_type_id, line.quantity)).collect())
            }
        };
        Ok(Self { event_id: req.event_id, wanted })
    }

    /// Whether an order stored earlier (its event, its lines and its ticket count) is what
    /// this purchase asks for: an `Idempotency-Key`'s replay answers only the same request.
    pub fn asks_for(&self, event_id: Uuid, lines: &[OrderLine], quantity: i32) -> bool {
        if event_id != self.event_id {
            return false;
        }
        match &self.wanted {
            Wanted::Items(items) => {
                let mut asked = items.clone();
                asked.sort();
                let mut stored: Vec<(Uuid, i64)> =
                    lines.iter().map(|line| (line.ticket_type_id, i64::from(line.quantity))).collect();
                stored.sort();
                asked == stored
            }
            // The seed's shape names no type: the same count in one line.
            Wanted::Default(asked) => lines.len() == 1 && i64::from(quantity) == *asked,
        }
    }
}

/// A purchase that passed the rules, priced: its event, its lines, its ticket count and total.
#[derive(Debug)]
pub struct Priced {
    pub event: EventForSale,
    pub lines: Vec<OrderLine>,
    pub quantity: i32,
    pub total: Decimal,
}

impl Priced {
    /// The price of one ticket of an order of one line (`unit_price`); `None` for several lines.
    pub fn unit_price(&self) -> Option<Decimal> {
        match self.lines.as_slice() {
            [line] => Some(line.unit_price),
            _ => None,
        }
    }
}

/// The purchase's lines against its event at `now` (see the module's summary).
pub fn price(event: EventForSale, purchase: &Purchase, now: DateTime<Utc>) -> Result<Priced, ApiError> {
    if !event.on_sale(now) {
        return Err(ApiError::invalid("event_unavailable", "the event has started; tickets are no longer sold"));
    }
    let wanted: Vec<(Uuid, i64)> = match &purchase.wanted {
        Wanted::Items(items) => items.clone(),
        Wanted::Default(quantity) => {
            let default =
                event.default_ticket_type_id.filter(|id| event.ticket_type(*id).is_some()).ok_or_else(|| {
                    ApiError::invalid(
                        "ticket_type_required",
                        "this event has no default ticket type; name the ticket types in items",
                    )
                })?;
            vec![(default, *quantity)]
        }
    };
    let mut lines = Vec::with_capacity(wanted.len());
    for (type_id, quantity) in wanted {
        let ticket_type = event.ticket_type(type_id).ok_or_else(|| {
            ApiError::invalid("unknown_ticket_type", format!("the event sells no ticket type {type_id}"))
        })?;
        if !ticket_type.on_sale(now) {
            return Err(not_on_sale(ticket_type));
        }
        let limit = [ticket_type.max_per_order, ticket_type.max_per_buyer].into_iter().flatten().min();
        if let Some(limit) = limit
            && quantity > i64::from(limit)
        {
            return Err(ApiError::invalid(
                "invalid_quantity",
                format!("at most {limit} tickets of {} may be bought", ticket_type.name),
            ));
        }
        // Bounded by the event's max_per_order (an i32) below; larger values fail there.
        let quantity = i32::try_from(quantity).unwrap_or(i32::MAX);
        lines.push(OrderLine {
            ticket_type_id: type_id,
            name: ticket_type.name.clone(),
            quantity,
            unit_price: ticket_type.price,
        });
    }
    let total_tickets: i64 = lines.iter().map(|line| i64::from(line.quantity)).sum();
    if total_tickets > i64::from(event.max_per_order) {
        return Err(ApiError::invalid(
            "invalid_quantity",
            format!("quantity must be between 1 and {} for this event", event.max_per_order),
        ));
    }
    if let Some(cap) = event.max_per_buyer
        && total_tickets > i64::from(cap)
    {
        return Err(ApiError::invalid(
            "invalid_quantity",
            format!("a buyer may hold at most {cap} tickets of this event"),
        ));
    }
    let total = lines.iter().map(OrderLine::amount).sum();
    // In range: at most max_per_order (an i32).
    Ok(Priced { event, lines, quantity: total_tickets as i32, total })
}

/// `422 not_on_sale`, with the type's sale window.
fn not_on_sale(ticket_type: &TypeForSale) -> ApiError {
    let window = match (ticket_type.sales_start, ticket_type.sales_end) {
        (Some(start), Some(end)) => format!("from {} until {}", start.to_rfc3339(), end.to_rfc3339()),
        (Some(start), None) => format!("from {}", start.to_rfc3339()),
        (None, Some(end)) => format!("until {}", end.to_rfc3339()),
        (None, None) => "never".to_owned(),
    };
    ApiError::invalid("not_on_sale", format!("{} is on sale {window}", ticket_type.name))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn money(amount: &str) -> Decimal {
        amount.parse().expect("an amount")
    }

    const EVENT: Uuid = Uuid::from_u128(1);
    const GENERAL: Uuid = Uuid::from_u128(10);
    const VIP: Uuid = Uuid::from_u128(11);

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, hour, 0, 0).unwrap()
    }

    fn kind(id: Uuid, name: &str, price: Decimal) -> TypeForSale {
        let (max_per_order, max_per_buyer, sales_start, sales_end) = (None, None, None, None);
        TypeForSale { id, name: name.to_owned(), price, max_per_order, max_per_buyer, sales_start, sales_end }
    }

    /// An event at 20:00 with General (20.00, the default) and VIP (99.50, on sale from 10:00 to 12:00, 2 per order).
    fn event() -> EventForSale {
        let vip = TypeForSale {
            max_per_order: Some(2),
            sales_start: Some(at(10)),
            sales_end: Some(at(12)),
            ..kind(VIP, "VIP", money("99.50"))
        };
        EventForSale {
            name: "Concert".to_owned(),
            starts_at: at(20),
            currency: "EUR".to_owned(),
            max_per_order: 6,
            max_per_buyer: Some(5),
            default_ticket_type_id: Some(GENERAL),
            types: sqlx::types::Json(vec![kind(GENERAL, "General", money("20.00")), vip]),
        }
    }

    fn request(quantity: Option<i64>, items: Option<&[(Uuid, i64)]>) -> CreateOrderRequest {
        let items = items.map(|items| {
            items.iter().map(|&(ticket_type_id, quantity)| OrderItem { ticket_type_id, quantity }).collect()
        });
        CreateOrderRequest { event_id: EVENT, quantity, items }
    }

    fn refusal<T: std::fmt::Debug>(result: Result<T, ApiError>) -> &'static str {
        result.expect_err("refused").code()
    }

    #[test]
    fn shapes_are_checked_before_anything_is_read() {
        assert_eq!(refusal(Purchase::parse(&request(Some(1), Some(&[(VIP, 1)])))), "invalid_body");
        assert_eq!(refusal(Purchase::parse(&request(None, None))), "invalid_body");
        assert_eq!(refusal(Purchase::parse(&request(Some(0), None))), "invalid_quantity");
        assert_eq!(refusal(Purchase::parse(&request(None, Some(&[])))), "invalid_items");
        assert_eq!(refusal(Purchase::parse(&request(None, Some(&[(VIP, 1); 21])))), "invalid_items");
        assert_eq!(refusal(Purchase::parse(&request(None, Some(&[(VIP, 1), (GENERAL, 0)])))), "invalid_quantity");
        assert_eq!(refusal(Purchase::parse(&request(None, Some(&[(VIP, 1), (VIP, 1)])))), "invalid_items");
        assert!(Purchase::parse(&request(None, Some(&[(VIP, 1), (GENERAL, 3)]))).is_ok());
    }

    #[test]
    fn lines_are_priced_from_the_catalogue() {
        let purchase = Purchase::parse(&request(None, Some(&[(VIP, 2), (GENERAL, 3)]))).unwrap();
        let priced = price(event(), &purchase, at(11)).unwrap();
        assert_eq!((priced.quantity, priced.total, priced.unit_price()), (5, money("259.00"), None));
        assert_eq!(
            priced.lines.iter().map(|l| (l.name.as_str(), l.quantity)).collect::<Vec<_>>(),
            [("VIP", 2), ("General", 3)]
        );
        let default = price(event(), &Purchase::parse(&request(Some(2), None)).unwrap(), at(11)).unwrap();
        assert_eq!(
            (default.lines[0].ticket_type_id, default.total, default.unit_price()),
            (GENERAL, money("40.00"), Some(money("20.00")))
        );
    }

    #[test]
    fn each_rule_refuses_with_its_code() {
        let priced = |req: CreateOrderRequest, now| refusal(price(event(), &Purchase::parse(&req).unwrap(), now));
        assert_eq!(priced(request(Some(1), None), at(20)), "event_unavailable");
        assert_eq!(priced(request(None, Some(&[(Uuid::from_u128(99), 1)])), at(11)), "unknown_ticket_type");
        assert_eq!(priced(request(None, Some(&[(VIP, 1)])), at(9)), "not_on_sale");
        assert_eq!(priced(request(None, Some(&[(VIP, 1)])), at(12)), "not_on_sale");
        assert_eq!(priced(request(None, Some(&[(VIP, 3)])), at(11)), "invalid_quantity");
        assert_eq!(priced(request(Some(7), None), at(11)), "invalid_quantity");
        assert_eq!(priced(request(Some(6), None), at(11)), "invalid_quantity", "the buyer cap of 5");
        let mut without_default = event();
        without_default.default_ticket_type_id = None;
        let purchase = Purchase::parse(&request(Some(1), None)).unwrap();
        assert_eq!(refusal(price(without_default, &purchase, at(11))), "ticket_type_required");
    }

    #[test]
    fn a_replay_answers_only_the_same_request() {
        let line = |ticket_type_id, quantity| OrderLine {
            ticket_type_id,
            name: String::new(),
            quantity,
            unit_price: money("1"),
        };
        let stored = [line(GENERAL, 3), line(VIP, 2)];
        let items = Purchase::parse(&request(None, Some(&[(VIP, 2), (GENERAL, 3)]))).unwrap();
        assert!(items.asks_for(EVENT, &stored, 5));
        assert!(!items.asks_for(Uuid::from_u128(2), &stored, 5));
        assert!(!items.asks_for(EVENT, &stored[..1], 3));
        let seed = Purchase::parse(&request(Some(3), None)).unwrap();
        assert!(seed.asks_for(EVENT, &stored[..1], 3));
        assert!(!seed.asks_for(EVENT, &stored[..1], 2));
        assert!(!seed.asks_for(EVENT, &stored, 5));
    }
}
