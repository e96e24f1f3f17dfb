//! The rules a purchase passes before it is stored, pure: its shape ([`Purchase::parse`],
//! checked once per request), then its lines against the event as the catalogue has it
//! ([`price`]): the event exists and is on sale, each line's type exists and is in its sale
//! window, the quantities are within the per-order limits and could ever fit the buyer caps
//! (whether the buyer's earlier orders leave room is the worker's to decide, under the
//! event's lock), and a promo code, if given, is live, in its window and names one of the
//! lines' types (whether it has uses left is the worker's to decide, likewise). The waiting
//! list's joins pass the same rules.

use chrono::{DateTime, Utc};
use common::domain::{Currency, OrderLine, money};
use rust_decimal::Decimal;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::catalog::{CodeForSale, EventForSale, SalePhase, TypeForSale};
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
    /// A promo code of the event (matched whatever its case): its discount applies to the
    /// lines of the types it names, and each of their tickets is one of its uses.
    #[schema(example = "EARLYBIRD", min_length = 3, max_length = 64, pattern = "^[A-Za-z0-9_-]+$")]
    pub promo_code: Option<String>,
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
    /// The promo code as sent, of a valid shape.
    pub promo_code: Option<String>,
}

/// Whether `code` has the shape of a promo code: 3 to 64 letters, digits, `-` and `_`.
pub fn promo_code_shape(code: &str) -> bool {
    (3..=64).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `422 invalid_promo_code`.
pub fn invalid_promo_code(message: String) -> ApiError {
    ApiError::invalid("invalid_promo_code", message)
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
        if let Some(code) = &req.promo_code
            && !promo_code_shape(code)
        {
            return Err(invalid_promo_code(
                "promo_code must be 3 to 64 letters, digits, '-' and '_'; this event has no such code".to_owned(),
            ));
        }
        Ok(Self { event_id: req.event_id, wanted, promo_code: req.promo_code.clone() })
    }

    /// Whether an order stored earlier (its event, its lines, its ticket count and its promo
    /// code) is what this purchase asks for: an `Idempotency-Key`'s replay answers only the
    /// same request.
    pub fn asks_for(&self, event_id: Uuid, lines: &[OrderLine], quantity: i32, promo_code: Option<&str>) -> bool {
        let same_code = match (self.promo_code.as_deref(), promo_code) {
            (Some(asked), Some(stored)) => asked.eq_ignore_ascii_case(stored),
            (asked, stored) => asked.is_none() && stored.is_none(),
        };
        if event_id != self.event_id || !same_code {
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

/// A purchase that passed the rules, priced: its event, its lines (after its promo code),
/// its ticket count, total and discount, and its code (id, as the organizer wrote it).
#[derive(Debug)]
pub struct Priced {
    pub event: EventForSale,
    pub lines: Vec<OrderLine>,
    pub quantity: i32,
    pub total: Decimal,
    pub discount: Decimal,
    pub promo_code: Option<(Uuid, String)>,
    /// Placed in the event's pre-sale window: a pre-sale entry, numbered by the draw.
    pub presale_entry: bool,
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
///
/// In the event's pre-sale window the purchase is a pre-sale entry, judged as if placed at
/// `sales_start` (the types' windows and the codes' as they will be at the opening); before
/// the window, it is refused `not_on_sale`.
pub fn price(event: EventForSale, purchase: &Purchase, now: DateTime<Utc>) -> Result<Priced, ApiError> {
    let (now, presale_entry) = judged_at(&event, now)?;
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
            list_price: None,
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
    let promo_code = match &purchase.promo_code {
        Some(name) => {
            let code = live_code(&event, name, &lines, now)?;
            let places = Currency::parse(&event.currency).map_or(money::SCALE, Currency::places);
            for line in lines.iter_mut().filter(|line| code.applies_to(line.ticket_type_id)) {
                line.list_price = Some(line.unit_price);
                line.unit_price = discounted(line.unit_price, code, places);
            }
            Some((code.id, code.code.clone()))
        }
        None => None,
    };
    if let Some(locked) = lines.iter().find(|line| {
        !line.under_promo_code() && event.ticket_type(line.ticket_type_id).is_some_and(|t| t.requires_promo_code)
    }) {
        return Err(ApiError::invalid(
            "promo_code_required",
            format!("{} is sold only with a promo code that names it", locked.name),
        ));
    }
    let total = lines.iter().map(OrderLine::amount).sum();
    let discount = lines.iter().map(OrderLine::discount).sum();
    // In range: at most max_per_order (an i32).
    Ok(Priced { event, lines, quantity: total_tickets as i32, total, discount, promo_code, presale_entry })
}

/// When a purchase placed `now` is judged, and whether it is a pre-sale entry: now while
/// the sale is open, at `sales_start` in the pre-sale window; refused before the window and
/// once the event has started.
fn judged_at(event: &EventForSale, now: DateTime<Utc>) -> Result<(DateTime<Utc>, bool), ApiError> {
    match event.phase(now) {
        SalePhase::Over => {
            Err(ApiError::invalid("event_unavailable", "the event has started; tickets are no longer sold"))
        }
        SalePhase::NotYet => Err(event_not_on_sale(event)),
        SalePhase::PreQueue => Ok((event.sales_start.unwrap_or(now), true)),
        SalePhase::Open => Ok((now, false)),
    }
}

/// `422 not_on_sale` for an event whose sale (or pre-sale queue) has not opened.
fn event_not_on_sale(event: &EventForSale) -> ApiError {
    let message = match (event.sales_start, event.prequeue_opens_at) {
        (Some(start), Some(opens)) => format!(
            "the pre-sale queue opens at {} and the sale at {}",
            opens.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        (Some(start), None) => {
            format!("the sale opens at {}", start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        _ => "the event is not on sale".to_owned(),
    };
    ApiError::invalid("not_on_sale", message)
}

/// The event's live code `name`, if it may be used `now` on these lines: in its window, and
/// naming one of their types.
fn live_code<'e>(
    event: &'e EventForSale,
    name: &str,
    lines: &[OrderLine],
    now: DateTime<Utc>,
) -> Result<&'e CodeForSale, ApiError> {
    let code = event
        .promo_code(name)
        .ok_or_else(|| invalid_promo_code(format!("{name} is not a promo code of this event")))?;
    if let Some(from) = code.valid_from
        && now < from
    {
        return Err(invalid_promo_code(format!("the promo code {name} is valid from {}", from.to_rfc3339())));
    }
    if let Some(until) = code.valid_until
        && now >= until
    {
        return Err(invalid_promo_code(format!("the promo code {name} expired at {}", until.to_rfc3339())));
    }
    if !lines.iter().any(|line| code.applies_to(line.ticket_type_id)) {
        return Err(invalid_promo_code(format!("the promo code {name} applies to none of the ticket types ordered")));
    }
    Ok(code)
}

/// One ticket's price under a code ([`money::discounted`]).
pub fn discounted(price: Decimal, code: &CodeForSale, places: u32) -> Decimal {
    money::discounted(price, code.percent_off, code.amount_off, places)
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
        let requires_promo_code = false;
        TypeForSale {
            id,
            name: name.to_owned(),
            price,
            max_per_order,
            max_per_buyer,
            sales_start,
            sales_end,
            requires_promo_code,
        }
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
            id: EVENT,
            name: "Concert".to_owned(),
            starts_at: at(20),
            sales_start: None,
            prequeue_opens_at: None,
            currency: "EUR".to_owned(),
            max_per_order: 6,
            max_per_buyer: Some(5),
            default_ticket_type_id: Some(GENERAL),
            types: sqlx::types::Json(vec![kind(GENERAL, "General", money("20.00")), vip]),
            codes: sqlx::types::Json(vec![]),
        }
    }

    fn request(quantity: Option<i64>, items: Option<&[(Uuid, i64)]>) -> CreateOrderRequest {
        let items = items.map(|items| {
            items.iter().map(|&(ticket_type_id, quantity)| OrderItem { ticket_type_id, quantity }).collect()
        });
        CreateOrderRequest { event_id: EVENT, quantity, items, promo_code: None }
    }

    fn refusal<T: std::fmt::Debug>(result: Result<T, ApiError>) -> &'static str {
        result.expect_err("refused").code()
    }

    #[test]
    fn before_sales_start_orders_are_refused_or_pre_sale_entries_judged_at_the_opening() {
        let presale = EventForSale { sales_start: Some(at(11)), prequeue_opens_at: Some(at(9)), ..event() };
        let vip = || request(None, Some(&[(VIP, 1)]));
        let priced = |event: &EventForSale, now| price(event.clone(), &Purchase::parse(&vip()).unwrap(), now);
        assert_eq!(refusal(priced(&presale, at(8))), "not_on_sale", "the pre-sale queue is not open yet");
        let entry = priced(&presale, at(9)).expect("an entry");
        assert!(entry.presale_entry, "VIP opens at 10, but the entry is judged at the opening, 11");
        let open = priced(&presale, at(11)).expect("on sale");
        assert!(!open.presale_entry);
        assert_eq!(refusal(priced(&presale, at(20))), "event_unavailable");
        let no_queue = EventForSale { prequeue_opens_at: None, ..presale.clone() };
        assert_eq!(refusal(priced(&no_queue, at(10))), "not_on_sale", "no ticket type sells before sales_start");
        let late = EventForSale { sales_start: Some(at(13)), ..presale };
        assert_eq!(refusal(priced(&late, at(10))), "not_on_sale", "VIP's window closes at 12, before the opening");
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

    fn code(name: &str, percent_off: Option<&str>, amount_off: Option<&str>, types: Option<Vec<Uuid>>) -> CodeForSale {
        CodeForSale {
            id: Uuid::from_u128(0xC0DE),
            code: name.to_owned(),
            percent_off: percent_off.map(money),
            amount_off: amount_off.map(money),
            ticket_type_ids: types,
            valid_from: Some(at(9)),
            valid_until: Some(at(12)),
        }
    }

    fn with_code(promo_code: &str, quantity: Option<i64>, items: Option<&[(Uuid, i64)]>) -> Purchase {
        Purchase::parse(&CreateOrderRequest { promo_code: Some(promo_code.to_owned()), ..request(quantity, items) })
            .unwrap()
    }

    #[test]
    fn a_code_discounts_the_lines_it_names_rounded_half_up_per_ticket() {
        let mut event = event();
        event.codes.0 = vec![code("Spring_25", Some("12.5"), None, Some(vec![GENERAL]))];
        // 20.00 - 12.5% = 17.50; VIP is not named.
        let priced =
            price(event.clone(), &with_code("SPRING_25", None, Some(&[(VIP, 1), (GENERAL, 3)])), at(11)).unwrap();
        assert_eq!(priced.promo_code, Some((Uuid::from_u128(0xC0DE), "Spring_25".to_owned())));
        assert_eq!((priced.lines[0].unit_price, priced.lines[0].list_price), (money("99.50"), None));
        assert_eq!((priced.lines[1].unit_price, priced.lines[1].list_price), (money("17.50"), Some(money("20.00"))));
        assert_eq!((priced.total, priced.discount), (money("152.00"), money("7.50")));
        // 99.50 × 66.67% = 66.33665 → 66.34 (at the cent); 99.50 × 0.5 = 49.75 exactly.
        let vip = |percent| {
            let mut event = event.clone();
            event.codes.0 = vec![code("VIPDEAL", Some(percent), None, None)];
            price(event, &with_code("vipdeal", None, Some(&[(VIP, 1)])), at(11)).unwrap().total
        };
        assert_eq!(vip("33.33"), money("66.34"));
        assert_eq!(vip("50"), money("49.75"));
        assert_eq!(vip("100"), money("0"));
        // 99.98 × 66.67% = 66.656666 → 66.66; 0.03 × 50% = 0.015, a midpoint, rounds up.
        let cents = code("X-Y", Some("33.33"), None, None);
        assert_eq!(discounted(money("99.98"), &cents, 2), money("66.66"));
        assert_eq!(discounted(money("0.03"), &code("X-Y", Some("50"), None, None), 2), money("0.02"));
        assert_eq!(discounted(money("101"), &code("X-Y", Some("50"), None, None), 0), money("51"), "whole yen");
        // An amount off never takes a price below zero; an access code takes nothing off.
        assert_eq!(discounted(money("20.00"), &code("X-Y", None, Some("25.00"), None), 2), money("0"));
        assert_eq!(discounted(money("20.00"), &code("X-Y", None, Some("5.5"), None), 2), money("14.50"));
        assert_eq!(discounted(money("20.00"), &code("X-Y", None, None, None), 2), money("20.00"));
    }

    #[test]
    fn a_code_is_refused_with_what_is_wrong_with_it() {
        let mut event = event();
        // VIP is on sale from 10:00 to 12:00, the code valid from 10:30 to 11:30.
        let half_past = |hour| at(hour) + chrono::Duration::minutes(30);
        let window = CodeForSale {
            valid_from: Some(half_past(10)),
            valid_until: Some(half_past(11)),
            ..code("VIPONLY", Some("10"), None, Some(vec![VIP]))
        };
        event.codes.0 = vec![window];
        let refused = |purchase: Purchase, now| price(event.clone(), &purchase, now).expect_err("refused").to_string();
        assert!(refused(with_code("NOPE", Some(1), None), at(11)).contains("not a promo code"));
        assert!(refused(with_code("viponly", Some(1), None), at(11)).contains("none of the ticket types"));
        assert!(refused(with_code("viponly", None, Some(&[(VIP, 1)])), at(10)).contains("valid from"));
        assert!(refused(with_code("viponly", None, Some(&[(VIP, 1)])), half_past(11)).contains("expired"));
        let shape_refusal = |code: &str| {
            refusal(Purchase::parse(&CreateOrderRequest { promo_code: Some(code.into()), ..request(Some(1), None) }))
        };
        assert_eq!(shape_refusal("AB"), "invalid_promo_code");
        assert_eq!(shape_refusal("has space"), "invalid_promo_code");
        assert_eq!(shape_refusal(&"A".repeat(65)), "invalid_promo_code");
        assert!(price(event.clone(), &with_code("VIPONLY", None, Some(&[(VIP, 1)])), at(11)).is_ok());
        // A type that requires a code: refused without one, or with one that does not name it.
        event.types.0[1].requires_promo_code = true;
        event.codes.0.push(code("GENERAL-ONLY", None, None, Some(vec![GENERAL])));
        let vip_line = Some(&[(VIP, 1), (GENERAL, 1)][..]);
        let items = Purchase::parse(&request(None, vip_line)).unwrap();
        assert_eq!(refusal(price(event.clone(), &items, at(11))), "promo_code_required");
        assert_eq!(
            refusal(price(event.clone(), &with_code("general-only", None, vip_line), at(11))),
            "promo_code_required"
        );
        assert!(price(event.clone(), &with_code("viponly", None, vip_line), at(11)).is_ok());
    }

    #[test]
    fn a_replay_answers_only_the_same_request() {
        let line = |ticket_type_id, quantity| OrderLine {
            ticket_type_id,
            name: String::new(),
            quantity,
            unit_price: money("1"),
            list_price: None,
        };
        let stored = [line(GENERAL, 3), line(VIP, 2)];
        let items = Purchase::parse(&request(None, Some(&[(VIP, 2), (GENERAL, 3)]))).unwrap();
        assert!(items.asks_for(EVENT, &stored, 5, None));
        assert!(!items.asks_for(Uuid::from_u128(2), &stored, 5, None));
        assert!(!items.asks_for(EVENT, &stored[..1], 3, None));
        assert!(!items.asks_for(EVENT, &stored, 5, Some("SPRING")), "the same lines with a code are another order");
        let seed = Purchase::parse(&request(Some(3), None)).unwrap();
        assert!(seed.asks_for(EVENT, &stored[..1], 3, None));
        assert!(!seed.asks_for(EVENT, &stored[..1], 2, None));
        assert!(!seed.asks_for(EVENT, &stored, 5, None));
        let coded =
            Purchase::parse(&CreateOrderRequest { promo_code: Some("spring".into()), ..request(Some(3), None) })
                .unwrap();
        assert!(coded.asks_for(EVENT, &stored[..1], 3, Some("SPRING")), "codes match whatever their case");
        assert!(!coded.asks_for(EVENT, &stored[..1], 3, None));
    }
}
