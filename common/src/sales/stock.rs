//! What an event has left, under its row lock, and the rules that decide whether an order
//! may have its tickets: the allocator's decisions (`worker`) and the waiting list's offers
//! (`waitlist`) both go through [`EventStock::decide`], so a ticket is granted by one set
//! of rules whoever asks. The rules are pure and unit-tested; [`load`] and
//! [`read_holdings`] read their inputs under an [`EventLock`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::EventLock;
use crate::domain::{OrderStatus, OrderTrigger, Transition, reason};

/// What the rules decided for one order: the [`OrderTrigger`] that moves it from `QUEUED`
/// (its status follows from [`OrderStatus::apply`]), and the type a refusal is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub order_id: Uuid,
    pub trigger: OrderTrigger,
    pub reason: Option<&'static str>,
    pub reason_type: Option<Uuid>,
}

impl Decision {
    /// Where the decision moves its `QUEUED` order, by the state machine: `None` if it could
    /// not move it (never, for what [`EventStock::decide`] makes; a test holds this).
    pub fn moves_to(&self) -> Option<OrderStatus> {
        match OrderStatus::Queued.apply(self.trigger) {
            Transition::Moves { to, .. } => Some(to),
            Transition::AlreadyThere | Transition::Impossible => None,
        }
    }

    /// The order's status after the decision (`QUEUED` if it could not move it).
    pub fn status(&self) -> OrderStatus {
        self.moves_to().unwrap_or(OrderStatus::Queued)
    }

    /// Whether the order got its tickets (`PENDING`, or `PAID` when free).
    pub fn allocated(&self) -> bool {
        matches!(self.trigger, OrderTrigger::Allocated | OrderTrigger::AllocatedFree)
    }
}

/// An order as the rules see it: a `QUEUED` order for the allocator, a waiting-list entry
/// for an offer.
#[derive(Clone, Debug)]
pub struct Request {
    pub order_id: Uuid,
    pub user_id: Uuid,
    /// When the api accepted it: sale windows are judged by this time, not by when the
    /// order is decided (a buyer in the queue before `sales_end` was in time).
    pub created_at: DateTime<Utc>,
    /// Costs nothing: paid as it is allocated.
    pub free: bool,
    /// (ticket type, quantity) per line.
    pub lines: Vec<(Uuid, i64)>,
    /// The promo code it was placed with, if any.
    pub promo_code: Option<PromoUse>,
}

/// An order's promo code, and the types of its lines the code applied to when the order was
/// accepted: their tickets are issued under the code, each one of its uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoUse {
    pub code: Uuid,
    pub types: Vec<Uuid>,
}

impl Request {
    pub fn tickets(&self) -> i64 {
        self.lines.iter().map(|(_, quantity)| quantity).sum()
    }

    /// The code its tickets of this type are issued under, if any.
    pub fn code_for(&self, type_id: Uuid) -> Option<Uuid> {
        self.promo_code.as_ref().filter(|used| used.types.contains(&type_id)).map(|used| used.code)
    }

    /// Its promo code and the uses it takes: its tickets of the types the code applies to.
    pub fn code_uses(&self) -> Option<(Uuid, i64)> {
        let used = self.promo_code.as_ref()?;
        let uses = self.lines.iter().filter(|(type_id, _)| used.types.contains(type_id)).map(|(_, q)| q).sum();
        Some((used.code, uses))
    }
}

/// A promo code under its event's lock: the uses left, and its per-buyer limit.
#[derive(Clone, Debug, Default)]
pub struct CodeStock {
    /// `max_uses - uses`, when it has a limit.
    pub left: Option<i64>,
    pub max_uses_per_buyer: Option<i64>,
}

/// Most unpaid (`PENDING`) orders one buyer may have for an event that caps its buyers
/// (`max_per_buyer` set): with the cap, what stops one account from holding an event's
/// stock in many small holds, renewed as they expire.
pub const MAX_PENDING_ORDERS_PER_BUYER: i64 = 3;

/// A ticket type under its event's lock.
#[derive(Clone, Debug, Default)]
pub struct TypeStock {
    /// Tickets of this type left, when it has stock of its own (else only the venue cap).
    pub left: Option<i64>,
    pub withdrawn: bool,
    pub sales_start: Option<DateTime<Utc>>,
    pub sales_end: Option<DateTime<Utc>>,
    pub max_per_buyer: Option<i64>,
    /// Sold only under a promo code that names it.
    pub requires_promo_code: bool,
}

impl TypeStock {
    pub fn on_sale_at(&self, at: DateTime<Utc>) -> bool {
        !self.withdrawn && self.sales_start.is_none_or(|start| at >= start) && self.sales_end.is_none_or(|end| at < end)
    }
}

/// An event under its lock: what is left of it, and what each buyer holds, as the orders
/// of the transaction take their tickets in turn.
#[derive(Clone, Debug, Default)]
pub struct EventStock {
    /// Not deleted and not started.
    pub open: bool,
    /// `capacity - sold`: the venue cap over all types.
    pub venue_left: i64,
    /// The event's `sales_start`: no type sells before it, so an order (a pre-sale entry)
    /// placed before it is judged as if placed at it.
    pub sales_start: Option<DateTime<Utc>>,
    pub max_per_buyer: Option<i64>,
    pub types: HashMap<Uuid, TypeStock>,
    /// Tickets each buyer holds of the event (`(user, None)`) and of each type
    /// (`(user, Some(type))`), in `PENDING` and `PAID` orders; read only when a cap exists.
    pub held: HashMap<(Uuid, Option<Uuid>), i64>,
    /// `PENDING` orders of each buyer for the event; read only when the event caps buyers.
    pub pending: HashMap<Uuid, i64>,
    /// The promo codes the orders being decided carry ([`read_codes`]).
    pub codes: HashMap<Uuid, CodeStock>,
    /// Tickets each buyer holds under each code (`(user, code)`), in `PENDING` and `PAID`
    /// orders; read only for codes with a per-buyer limit.
    pub code_held: HashMap<(Uuid, Uuid), i64>,
}

impl EventStock {
    /// Whether any buyer cap applies (only then are holdings read).
    pub fn caps_buyers(&self) -> bool {
        self.max_per_buyer.is_some() || self.types.values().any(|t| t.max_per_buyer.is_some())
    }

    /// Decides one order, in arrival order: all of it or nothing. Refused orders take
    /// nothing, so a later (smaller) order may still fit. An order that costs nothing is
    /// paid as it is allocated. Pure, so the rules are unit-tested.
    pub fn decide(&mut self, order: &Request) -> Decision {
        let (trigger, reason, reason_type) = match self.refusal(order) {
            Some((reason, reason_type)) => (OrderTrigger::AllocationRejected, Some(reason), reason_type),
            None => {
                self.take(order);
                if order.free {
                    (OrderTrigger::AllocatedFree, Some(reason::FREE_ORDER), None)
                } else {
                    (OrderTrigger::Allocated, None, None)
                }
            }
        };
        Decision { order_id: order.order_id, trigger, reason, reason_type }
    }

    /// Why the order cannot have its tickets, if it cannot: the event is closed; a line's
    /// type is not on sale at the order's arrival (at `sales_start` for a pre-sale entry), or is sold only under a promo code and
    /// the line is not under one; the buyer would pass a cap; the buyer
    /// would pass the promo code's per-buyer limit; the code has too few uses left; a type
    /// is out of stock; the venue is full. In that order.
    fn refusal(&self, order: &Request) -> Option<(&'static str, Option<Uuid>)> {
        if !self.open {
            return Some((reason::EVENT_UNAVAILABLE, None));
        }
        let placed = self.sales_start.map_or(order.created_at, |start| order.created_at.max(start));
        for (type_id, _) in &order.lines {
            if !self.types.get(type_id).is_some_and(|t| t.on_sale_at(placed)) {
                return Some((reason::NOT_ON_SALE, Some(*type_id)));
            }
        }
        for (type_id, _) in &order.lines {
            if self.types[type_id].requires_promo_code && order.code_for(*type_id).is_none() {
                return Some((reason::PROMO_CODE_REQUIRED, Some(*type_id)));
            }
        }
        let total = order.tickets();
        let held = |key: Option<Uuid>| self.held.get(&(order.user_id, key)).copied().unwrap_or(0);
        if self.max_per_buyer.is_some_and(|cap| held(None) + total > cap) {
            return Some((reason::BUYER_LIMIT, None));
        }
        let pending = self.pending.get(&order.user_id).copied().unwrap_or(0);
        if self.max_per_buyer.is_some() && !order.free && pending >= MAX_PENDING_ORDERS_PER_BUYER {
            return Some((reason::BUYER_LIMIT, None));
        }
        for (type_id, quantity) in &order.lines {
            if self.types[type_id].max_per_buyer.is_some_and(|cap| held(Some(*type_id)) + quantity > cap) {
                return Some((reason::BUYER_LIMIT, Some(*type_id)));
            }
        }
        if let Some((code_id, uses)) = order.code_uses() {
            let code = self.codes.get(&code_id).cloned().unwrap_or_default();
            let held = self.code_held.get(&(order.user_id, code_id)).copied().unwrap_or(0);
            if code.max_uses_per_buyer.is_some_and(|cap| held + uses > cap) {
                return Some((reason::PROMO_CODE_BUYER_LIMIT, None));
            }
            if code.left.is_some_and(|left| uses > left) {
                return Some((reason::PROMO_CODE_USED_UP, None));
            }
        }
        for (type_id, quantity) in &order.lines {
            if self.types[type_id].left.is_some_and(|left| *quantity > left) {
                return Some((reason::SOLD_OUT, Some(*type_id)));
            }
        }
        if total > self.venue_left {
            // A type without stock of its own is sold out when the venue is.
            return Some(match order.lines.iter().find(|(type_id, _)| self.types[type_id].left.is_none()) {
                Some((type_id, _)) => (reason::SOLD_OUT, Some(*type_id)),
                None => (reason::VENUE_FULL, None),
            });
        }
        None
    }

    fn take(&mut self, order: &Request) {
        let total = order.tickets();
        self.venue_left -= total;
        let track = self.caps_buyers();
        if track {
            *self.held.entry((order.user_id, None)).or_default() += total;
            if !order.free {
                *self.pending.entry(order.user_id).or_default() += 1;
            }
        }
        for (type_id, quantity) in &order.lines {
            if let Some(stock) = self.types.get_mut(type_id)
                && let Some(left) = stock.left.as_mut()
            {
                *left -= quantity;
            }
            if track {
                *self.held.entry((order.user_id, Some(*type_id))).or_default() += quantity;
            }
        }
        if let Some((code_id, uses)) = order.code_uses()
            && let Some(code) = self.codes.get_mut(&code_id)
        {
            if let Some(left) = code.left.as_mut() {
                *left -= uses;
            }
            if code.max_uses_per_buyer.is_some() {
                *self.code_held.entry((order.user_id, code_id)).or_default() += uses;
            }
        }
    }
}

/// What the locked events have left, with their ticket types, as the transaction sees them
/// now (after its own releases or edits), in one statement.
pub async fn load(lock: &mut EventLock<'_>) -> sqlx::Result<HashMap<Uuid, EventStock>> {
    let event_ids = lock.ids();
    // Rows in binary, an event's columns repeated on each of its types: cheaper, on a day of
    // many events, than a JSON aggregate per event row. Each event and its types are looked
    // up by the event's id (lateral lookups the planner cannot turn into joins), whatever the
    // statistics say: a generic plan's estimate of 10 events made that a sequential scan of
    // `ticket_types` on each batch, and an `= ANY` filter on such a scan costs the table's
    // rows times the batch's events (213 ms a batch of 1,400 events in `make bench`).
    let rows = sqlx::query!(
        r#"SELECT e.id AS "id!", e.capacity - e.sold AS "venue_left!",
                  coalesce(e.deleted_at IS NULL AND e.starts_at > now(), false) AS "open!",
                  e.sales_start AS "event_sales_start?", e.max_per_buyer AS event_cap, t.id AS "type_id?", t.capacity - t.sold AS "left",
                  t.deleted_at IS NOT NULL AS "withdrawn?", t.sales_start AS "sales_start?",
                  t.sales_end AS "sales_end?", t.max_per_buyer AS "type_cap?",
                  t.requires_promo_code AS "requires_promo_code?"
           FROM UNNEST($1::uuid[]) AS k(id)
           CROSS JOIN LATERAL (SELECT * FROM events e WHERE e.id = k.id OFFSET 0) e
           LEFT JOIN LATERAL (SELECT * FROM ticket_types t WHERE t.event_id = k.id OFFSET 0) t ON true"#,
        &event_ids
    )
    .fetch_all(lock.conn())
    .await?;
    let mut events: HashMap<Uuid, EventStock> = HashMap::with_capacity(event_ids.len());
    for row in rows {
        let event = events.entry(row.id).or_insert_with(|| EventStock {
            open: row.open,
            venue_left: i64::from(row.venue_left).max(0),
            sales_start: row.event_sales_start,
            max_per_buyer: row.event_cap.map(i64::from),
            ..Default::default()
        });
        if let Some(type_id) = row.type_id {
            let stock = TypeStock {
                left: row.left.map(|left| i64::from(left).max(0)),
                withdrawn: row.withdrawn.unwrap_or(true),
                sales_start: row.sales_start,
                sales_end: row.sales_end,
                max_per_buyer: row.type_cap.map(i64::from),
                requires_promo_code: row.requires_promo_code.unwrap_or(false),
            };
            event.types.insert(type_id, stock);
        }
    }
    Ok(events)
}

/// What these (event, buyer) pairs already hold, for the events that cap buyers (one
/// statement, none when no event does): their `ACTIVE` tickets, which are those of their
/// `PENDING` and `PAID` orders. Orders queued ahead of an order are decided before it and
/// counted as they are (`EventStock::take`).
pub async fn read_holdings(
    lock: &mut EventLock<'_>,
    events: &mut HashMap<Uuid, EventStock>,
    buyers: impl Iterator<Item = (Uuid, Uuid)>,
) -> sqlx::Result<()> {
    let mut pairs: Vec<(Uuid, Uuid)> =
        buyers.filter(|(event_id, _)| events.get(event_id).is_some_and(EventStock::caps_buyers)).collect();
    if pairs.is_empty() {
        return Ok(());
    }
    pairs.sort();
    pairs.dedup();
    let (event_ids, user_ids): (Vec<Uuid>, Vec<Uuid>) = pairs.into_iter().unzip();
    // Tickets per type (rows with a type), and `PENDING` orders (rows without one).
    let held = sqlx::query!(
        r#"WITH live AS (
               SELECT o.id, o.event_id, o.user_id, o.status
               FROM UNNEST($1::uuid[], $2::uuid[]) AS b(event_id, user_id)
               JOIN orders o ON o.user_id = b.user_id AND o.event_id = b.event_id AND o.status IN ('PENDING', 'PAID'))
           SELECT live.event_id AS "event_id!", live.user_id AS "user_id!", t.ticket_type_id AS "ticket_type_id?",
                  count(*) AS "count!"
           FROM live JOIN tickets t ON t.order_id = live.id AND t.status = 'ACTIVE'
           GROUP BY 1, 2, 3
           UNION ALL
           SELECT event_id, user_id, NULL, count(*) FROM live WHERE status = 'PENDING' GROUP BY 1, 2"#,
        &event_ids,
        &user_ids
    )
    .fetch_all(lock.conn())
    .await?
    .into_iter()
    .map(|row| (row.event_id, row.user_id, row.ticket_type_id, row.count));
    for (event_id, user_id, type_id, count) in held {
        let Some(event) = events.get_mut(&event_id) else { continue };
        match type_id {
            Some(type_id) => {
                *event.held.entry((user_id, None)).or_default() += count;
                *event.held.entry((user_id, Some(type_id))).or_default() += count;
            }
            None => *event.pending.entry(user_id).or_default() += count,
        }
    }
    Ok(())
}

/// The promo codes these (buyer, code) orders carry, with what each has left, and for
/// the codes with a per-buyer limit what each of these buyers holds under them (two
/// statements at most, none when no order carries a code). Withdrawn codes are read too:
/// orders placed with them keep them.
pub async fn read_codes(
    lock: &mut EventLock<'_>,
    events: &mut HashMap<Uuid, EventStock>,
    uses: impl Iterator<Item = (Uuid, Uuid)>,
) -> sqlx::Result<()> {
    let mut uses: Vec<(Uuid, Uuid)> = uses.collect();
    if uses.is_empty() {
        return Ok(());
    }
    uses.sort();
    uses.dedup();
    let mut code_ids: Vec<Uuid> = uses.iter().map(|(_, code)| *code).collect();
    code_ids.sort();
    code_ids.dedup();
    let event_ids = lock.ids();
    let codes = sqlx::query!(
        r#"SELECT id, event_id, max_uses - uses AS "left", max_uses_per_buyer
           FROM promo_codes WHERE id = ANY($1) AND event_id = ANY($2)"#,
        &code_ids,
        &event_ids
    )
    .fetch_all(lock.conn())
    .await?;
    let mut per_buyer_capped = Vec::new();
    for row in codes {
        let Some(event) = events.get_mut(&row.event_id) else { continue };
        if row.max_uses_per_buyer.is_some() {
            per_buyer_capped.push(row.id);
        }
        let code = CodeStock {
            left: row.left.map(|left| i64::from(left).max(0)),
            max_uses_per_buyer: row.max_uses_per_buyer.map(i64::from),
        };
        event.codes.insert(row.id, code);
    }
    let (buyers, capped_codes): (Vec<Uuid>, Vec<Uuid>) =
        uses.into_iter().filter(|(_, code)| per_buyer_capped.contains(code)).unzip();
    if buyers.is_empty() {
        return Ok(());
    }
    // From the index alone (its uses are on the order, and a PENDING or PAID order holds all
    // its tickets): no join with `tickets`, whose plan a fresh sale's empty statistics could
    // make a scan of every ticket of the code (37 ms a batch in `make bench`).
    let held = sqlx::query!(
        r#"SELECT o.event_id, o.user_id, o.promo_code_id AS "promo_code_id!", sum(o.promo_uses) AS "uses!"
           FROM UNNEST($1::uuid[], $2::uuid[]) AS b(user_id, promo_code_id)
           JOIN orders o ON o.promo_code_id = b.promo_code_id AND o.user_id = b.user_id
           WHERE o.status IN ('PENDING', 'PAID')
           GROUP BY 1, 2, 3"#,
        &buyers,
        &capped_codes
    )
    .fetch_all(lock.conn())
    .await?;
    for row in held {
        if let Some(event) = events.get_mut(&row.event_id) {
            *event.code_held.entry((row.user_id, row.promo_code_id)).or_default() += row.uses;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    const GENERAL: Uuid = Uuid::from_u128(0x100);
    const VIP: Uuid = Uuid::from_u128(0x200);
    const BUYER: Uuid = Uuid::from_u128(0x300);

    fn at(minute: u32) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2030, 1, 1, 12, minute, 0).unwrap()
    }

    /// An event of one type without stock of its own (as the seed creates them).
    fn seed_event(available: i64, open: bool) -> EventStock {
        let types = HashMap::from([(GENERAL, TypeStock::default())]);
        EventStock { open, venue_left: available, types, ..Default::default() }
    }

    fn request(order_id: Uuid, lines: &[(Uuid, i64)]) -> Request {
        Request { order_id, user_id: BUYER, created_at: at(0), free: false, lines: lines.to_vec(), promo_code: None }
    }

    /// Seed-shaped orders (id, quantity, free) against `stock`: the decisions and the tickets issued.
    fn allocate(stock: &mut EventStock, orders: &[(Uuid, i64, bool)]) -> (Vec<Decision>, i64) {
        let before = stock.venue_left;
        let decisions = orders
            .iter()
            .map(|&(id, quantity, free)| stock.decide(&Request { free, ..request(id, &[(GENERAL, quantity)]) }))
            .collect();
        (decisions, before - stock.venue_left)
    }

    fn outcomes(decisions: &[Decision]) -> Vec<(OrderStatus, Option<&'static str>, Option<Uuid>)> {
        decisions.iter().map(|d| (d.status(), d.reason, d.reason_type)).collect()
    }

    const ACCEPTED: (OrderStatus, Option<&str>, Option<Uuid>) = (OrderStatus::Pending, None, None);

    #[test]
    fn allocates_in_arrival_order_and_lets_smaller_orders_fit() {
        let id = ids(4);
        let orders = [(id[0], 3, false), (id[1], 4, false), (id[2], 2, false), (id[3], 1, false)];
        let (decisions, issued) = allocate(&mut seed_event(5, true), &orders);
        let sold_out = (OrderStatus::Rejected, Some(reason::SOLD_OUT), Some(GENERAL));
        assert_eq!(outcomes(&decisions), [ACCEPTED, sold_out, ACCEPTED, sold_out]);
        assert_eq!(issued, 5);
    }

    #[test]
    fn decisions_are_moves_of_the_state_machine() {
        let id = ids(3);
        let (open, _) = allocate(&mut seed_event(2, true), &[(id[0], 1, false), (id[1], 1, true), (id[2], 1, false)]);
        let (closed, _) = allocate(&mut seed_event(1, false), &[(id[2], 1, true)]);
        let mut seen = Vec::new();
        for decision in open.iter().chain(&closed) {
            assert_eq!(
                OrderStatus::Queued.apply(decision.trigger),
                Transition::Moves { to: decision.status(), releases_tickets: false },
                "{decision:?}"
            );
            assert_eq!(decision.allocated(), matches!(decision.status(), OrderStatus::Pending | OrderStatus::Paid));
            seen.push(decision.status());
        }
        assert_eq!(seen, [OrderStatus::Pending, OrderStatus::Paid, OrderStatus::Rejected, OrderStatus::Rejected]);
    }

    #[test]
    fn free_orders_are_paid_when_allocated() {
        let id = ids(3);
        let (decisions, issued) =
            allocate(&mut seed_event(3, true), &[(id[0], 2, true), (id[1], 2, true), (id[2], 1, false)]);
        assert_eq!(
            outcomes(&decisions),
            [
                (OrderStatus::Paid, Some(reason::FREE_ORDER), None),
                (OrderStatus::Rejected, Some(reason::SOLD_OUT), Some(GENERAL)),
                ACCEPTED,
            ]
        );
        assert_eq!(issued, 3);
    }

    #[test]
    fn closed_events_reject_everything() {
        let id = ids(2);
        let (decisions, issued) = allocate(&mut seed_event(100, false), &[(id[0], 1, false), (id[1], 1, true)]);
        assert!(decisions.iter().all(|d| d.reason == Some(reason::EVENT_UNAVAILABLE)));
        assert_eq!(issued, 0);
    }

    #[test]
    fn never_issues_more_than_available() {
        // Every split of 1..=4 tickets over random-ish inputs: issued <= available, and every
        // rejected order asked for more than what is left.
        for available in 0..20i64 {
            let orders: Vec<(Uuid, i64, bool)> = (0..15u128)
                .map(|i| (Uuid::from_u128(i), ((i * 7 + available as u128) % 4 + 1) as i64, i % 3 == 0))
                .collect();
            let (decisions, issued) = allocate(&mut seed_event(available, true), &orders);
            assert!(issued <= available);
            let left = available - issued;
            for (decision, (_, quantity, _)) in decisions.iter().zip(&orders) {
                if decision.status() == OrderStatus::Rejected {
                    assert!(*quantity > left, "a rejected order would have fit");
                }
            }
        }
    }

    /// General (no stock of its own) and VIP (2 of its own) under a venue cap of 5.
    fn tiered() -> EventStock {
        let vip = TypeStock { left: Some(2), ..Default::default() };
        let types = HashMap::from([(GENERAL, TypeStock::default()), (VIP, vip)]);
        EventStock { open: true, venue_left: 5, types, ..Default::default() }
    }

    #[test]
    fn types_and_the_venue_cap_run_out_each_with_its_reason() {
        let mut stock = tiered();
        let id = ids(6);
        let decisions: Vec<_> = [
            request(id[0], &[(VIP, 1), (GENERAL, 1)]),
            request(id[1], &[(VIP, 2)]),               // VIP has 1 left
            request(id[2], &[(VIP, 1), (GENERAL, 3)]), // 5 > 3 left in the venue: General is sold out
            request(id[3], &[(VIP, 1)]),               // fits
            request(id[4], &[(GENERAL, 2)]),           // fits: the venue is now full
            request(id[5], &[(VIP, 1)]),               // VIP's own stock is gone first
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let rejected = |reason, t| (OrderStatus::Rejected, Some(reason), t);
        assert_eq!(
            outcomes(&decisions),
            [
                ACCEPTED,
                rejected(reason::SOLD_OUT, Some(VIP)),
                rejected(reason::SOLD_OUT, Some(GENERAL)),
                ACCEPTED,
                ACCEPTED,
                rejected(reason::SOLD_OUT, Some(VIP)),
            ]
        );
        assert_eq!((stock.venue_left, stock.types[&VIP].left), (0, Some(0)));
    }

    #[test]
    fn a_full_venue_is_venue_full_when_every_line_had_its_own_stock() {
        let mut stock = tiered();
        stock.venue_left = 1;
        let decision = stock.decide(&request(Uuid::from_u128(1), &[(VIP, 2)]));
        assert_eq!(outcomes(&[decision]), [(OrderStatus::Rejected, Some(reason::VENUE_FULL), None)]);
        assert_eq!(stock.types[&VIP].left, Some(2), "a refused order takes nothing");
    }

    #[test]
    fn buyer_caps_count_what_the_buyer_holds_and_what_they_just_got() {
        let mut stock = tiered();
        stock.venue_left = 100;
        stock.max_per_buyer = Some(4);
        stock.types.get_mut(&VIP).unwrap().max_per_buyer = Some(1);
        stock.types.get_mut(&VIP).unwrap().left = Some(50);
        stock.held.insert((BUYER, None), 1);
        let id = ids(5);
        let other = Request { user_id: Uuid::from_u128(0x999), ..request(id[4], &[(GENERAL, 4)]) };
        let decisions: Vec<_> = [
            request(id[0], &[(VIP, 1), (GENERAL, 1)]), // holds 3
            request(id[1], &[(VIP, 1)]),               // VIP cap 1
            request(id[2], &[(GENERAL, 2)]),           // 5 > 4
            request(id[3], &[(GENERAL, 1)]),           // holds 4
            other,                                     // another buyer's cap is their own
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let limit = |t| (OrderStatus::Rejected, Some(reason::BUYER_LIMIT), t);
        assert_eq!(outcomes(&decisions), [ACCEPTED, limit(Some(VIP)), limit(None), ACCEPTED, ACCEPTED]);
    }

    #[test]
    fn a_code_is_never_used_past_its_limits_and_refused_orders_take_no_use() {
        const CODE: Uuid = Uuid::from_u128(0xC0DE);
        let mut stock = tiered();
        stock.venue_left = 100;
        stock.types.get_mut(&VIP).unwrap().left = Some(50);
        stock.codes.insert(CODE, CodeStock { left: Some(5), max_uses_per_buyer: Some(3) });
        stock.code_held.insert((BUYER, CODE), 1);
        let other = Uuid::from_u128(0x999);
        let id = ids(8);
        let coded = |id, user, lines: &[(Uuid, i64)], types: &[Uuid]| Request {
            user_id: user,
            promo_code: Some(PromoUse { code: CODE, types: types.to_vec() }),
            ..request(id, lines)
        };
        let decisions: Vec<_> = [
            coded(id[0], BUYER, &[(VIP, 2), (GENERAL, 3)], &[VIP]), // the code on VIP only: holds 3 under it, 3 left
            coded(id[1], BUYER, &[(VIP, 1)], &[VIP]),               // 4 > the buyer's 3
            coded(id[2], other, &[(VIP, 3)], &[VIP]),               // 0 left
            coded(id[3], Uuid::from_u128(0x997), &[(GENERAL, 1)], &[GENERAL]), // used up
            request(id[4], &[(GENERAL, 1)]),                        // no code: not counted
            coded(id[5], other, &[(VIP, 200)], &[GENERAL]),         // sold out, and no VIP ticket under the code ...
            coded(id[6], other, &[(VIP, 1)], &[GENERAL]),           // ... so this one takes no use either
            coded(id[7], Uuid::from_u128(0x998), &[(VIP, 1)], &[VIP]),
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let rejected = |reason, t| (OrderStatus::Rejected, Some(reason), t);
        assert_eq!(
            outcomes(&decisions),
            [
                ACCEPTED,
                rejected(reason::PROMO_CODE_BUYER_LIMIT, None),
                ACCEPTED,
                rejected(reason::PROMO_CODE_USED_UP, None),
                ACCEPTED,
                rejected(reason::SOLD_OUT, Some(VIP)),
                ACCEPTED,
                rejected(reason::PROMO_CODE_USED_UP, None),
            ]
        );
        assert_eq!(stock.codes[&CODE].left, Some(0));
        assert_eq!(stock.code_held[&(BUYER, CODE)], 3);
    }

    #[test]
    fn a_type_that_requires_a_code_is_sold_only_on_lines_under_one() {
        const CODE: Uuid = Uuid::from_u128(0xC0DE);
        let mut stock = tiered();
        stock.types.get_mut(&VIP).unwrap().requires_promo_code = true;
        let id = ids(4);
        let under = |id, types: &[Uuid]| Request {
            promo_code: Some(PromoUse { code: CODE, types: types.to_vec() }),
            ..request(id, &[(VIP, 1), (GENERAL, 1)])
        };
        let decisions: Vec<_> = [
            request(id[0], &[(VIP, 1)]),     // no code
            under(id[1], &[GENERAL]),        // a code, but not on the VIP line
            under(id[2], &[VIP]),            // under the code
            request(id[3], &[(GENERAL, 1)]), // the other type needs none
        ]
        .iter()
        .map(|r| stock.decide(r))
        .collect();
        let required = (OrderStatus::Rejected, Some(reason::PROMO_CODE_REQUIRED), Some(VIP));
        assert_eq!(outcomes(&decisions), [required, required, ACCEPTED, ACCEPTED]);
    }

    #[test]
    fn a_capped_event_takes_at_most_three_unpaid_orders_per_buyer() {
        let mut stock = tiered();
        stock.venue_left = 100;
        stock.max_per_buyer = Some(10);
        stock.pending.insert(BUYER, 1);
        let id = ids(4);
        let free = Request { free: true, ..request(id[3], &[(GENERAL, 1)]) };
        let decisions: Vec<_> =
            [request(id[0], &[(GENERAL, 1)]), request(id[1], &[(GENERAL, 1)]), request(id[2], &[(GENERAL, 1)]), free]
                .iter()
                .map(|r| stock.decide(r))
                .collect();
        let limit = (OrderStatus::Rejected, Some(reason::BUYER_LIMIT), None);
        let paid_at_once = (OrderStatus::Paid, Some(reason::FREE_ORDER), None);
        assert_eq!(outcomes(&decisions), [ACCEPTED, ACCEPTED, limit, paid_at_once]);
        // Uncapped on purpose: no limit on unpaid orders either.
        stock.max_per_buyer = None;
        assert_eq!(outcomes(&[stock.decide(&request(Uuid::from_u128(9), &[(GENERAL, 1)]))]), [ACCEPTED]);
    }

    #[test]
    fn sale_windows_are_judged_at_arrival() {
        let mut stock = tiered();
        let vip = stock.types.get_mut(&VIP).unwrap();
        vip.sales_start = Some(at(10));
        vip.sales_end = Some(at(20));
        let id = ids(4);
        let arriving = |id, minute| Request { created_at: at(minute), ..request(id, &[(VIP, 1)]) };
        let decisions: Vec<_> = [arriving(id[0], 9), arriving(id[1], 10), arriving(id[2], 19), arriving(id[3], 20)]
            .iter()
            .map(|r| stock.decide(r))
            .collect();
        let closed = (OrderStatus::Rejected, Some(reason::NOT_ON_SALE), Some(VIP));
        assert_eq!(outcomes(&decisions), [closed, ACCEPTED, ACCEPTED, closed]);
        stock.types.get_mut(&VIP).unwrap().withdrawn = true;
        let unknown = Uuid::from_u128(0xdead);
        let late: Vec<_> =
            [arriving(id[0], 15), request(id[1], &[(unknown, 1)])].iter().map(|r| stock.decide(r)).collect();
        assert_eq!(outcomes(&late), [closed, (OrderStatus::Rejected, Some(reason::NOT_ON_SALE), Some(unknown))]);
    }
}
