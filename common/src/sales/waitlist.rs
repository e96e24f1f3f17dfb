//! The waiting list's offers: tickets released while buyers wait (a hold expiring, an order
//! cancelled, a payment declined, a refund, capacity raised) are offered to the event's
//! `WAITING` entries in join order, in the transaction that released them, under the event's
//! lock. Each entry that fits (the allocator's rules, [`EventStock::decide`]: type on sale,
//! buyer caps, the type's stock and the venue cap) gets an order of its own in `PENDING`,
//! with reason `WAITLIST_OFFER` and a hold of `WAITLIST_OFFER_TTL_SECS`; an entry that does
//! not fit keeps its place and the next one is tried. Whatever no entry takes goes back on
//! sale. An entry that carries a promo code is offered its tickets under it (priced and
//! counted as an order placed with it), if the code is still live and names the type then;
//! otherwise at the type's price.
//!
//! **Order with purchases.** The offers are made before the transaction commits, so the
//! released tickets reach the waiting list before any purchase request decided after the
//! release: the waiting list queued earlier. Purchase requests decided before the release
//! never saw those tickets. Both are decided one after the other under the event's lock, so
//! no ticket is ever offered and sold at once.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::stock::{self, Decision, EventStock, PromoUse, Request};
use super::{EventLock, Tickets, tickets};
use crate::domain::{Currency, OrderLine, OrderStatus, money, reason};

/// Waiting entries read per round of an offer pass.
const PAGE: i64 = 500;

/// An offer made: the entry and the order created for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub entry_id: Uuid,
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub quantity: i64,
}

/// One waiting entry, with what its order would cost, and its promo code if that is live
/// now and names the type.
struct Waiting {
    id: Uuid,
    user_id: Uuid,
    ticket_type_id: Uuid,
    quantity: i32,
    type_name: String,
    price: Decimal,
    currency: String,
    promo_code_id: Option<Uuid>,
    promo_code: Option<String>,
    percent_off: Option<Decimal>,
    amount_off: Option<Decimal>,
}

impl Waiting {
    /// The price of one ticket of the offer: under the entry's code, if it has one.
    fn unit_price(&self) -> Decimal {
        match self.promo_code_id {
            Some(_) => {
                let places = Currency::parse(&self.currency).map_or(money::SCALE, Currency::places);
                money::discounted(self.price, self.percent_off, self.amount_off, places)
            }
            None => self.price,
        }
    }
}

/// Offers what the locked event has left to its waiting list, in join order (see the
/// module's summary). Returns the offers made; none when nobody waits, which is one index
/// probe.
pub async fn offer(lock: &mut EventLock<'_>, event_id: Uuid, offer_ttl: Duration) -> sqlx::Result<Vec<Offer>> {
    lock.check_holds(event_id)?;
    let mut offers = Vec::new();
    let mut after: Option<Uuid> = None;
    let mut loaded: Option<HashMap<Uuid, EventStock>> = None;
    loop {
        let waiting: Vec<Waiting> = sqlx::query_as!(
            Waiting,
            r#"SELECT w.id, w.user_id, w.ticket_type_id, w.quantity, t.name AS type_name, t.price, e.currency,
                      c.id AS "promo_code_id?", c.code AS "promo_code?", c.percent_off, c.amount_off
               FROM waitlist_entries w
               JOIN ticket_types t ON t.id = w.ticket_type_id
               JOIN events e ON e.id = w.event_id
               LEFT JOIN promo_codes c ON c.id = w.promo_code_id AND c.withdrawn_at IS NULL
                    AND (c.valid_from IS NULL OR c.valid_from <= now()) AND (c.valid_until IS NULL OR now() < c.valid_until)
                    AND (c.ticket_type_ids IS NULL OR w.ticket_type_id = ANY(c.ticket_type_ids))
               WHERE w.event_id = $1 AND w.status = 'WAITING' AND ($2::uuid IS NULL OR w.id > $2)
               ORDER BY w.id LIMIT $3"#,
            event_id,
            after,
            PAGE
        )
        .fetch_all(lock.conn())
        .await?;
        let Some(last) = waiting.last() else { break };
        after = Some(last.id);
        let events = match &mut loaded {
            Some(events) => events,
            None => loaded.insert(stock::load(lock).await?),
        };
        if !events.get(&event_id).is_some_and(|event| event.open && event.venue_left > 0) {
            break;
        }
        stock::read_holdings(lock, events, waiting.iter().map(|entry| (event_id, entry.user_id))).await?;
        let uses = waiting.iter().filter_map(|entry| entry.promo_code_id.map(|code| (entry.user_id, code)));
        stock::read_codes(lock, events, uses).await?;
        let Some(event) = events.get_mut(&event_id) else { break };
        let now = Utc::now();
        let mut made = Vec::new();
        for entry in &waiting {
            let request = Request {
                order_id: Uuid::now_v7(),
                user_id: entry.user_id,
                created_at: now,
                free: entry.unit_price().is_zero(),
                lines: vec![(entry.ticket_type_id, i64::from(entry.quantity))],
                promo_code: entry.promo_code_id.map(|code| PromoUse { code, types: vec![entry.ticket_type_id] }),
            };
            let decision = event.decide(&request);
            if decision.allocated() {
                made.push((entry, decision));
            }
            if event.venue_left == 0 {
                break;
            }
        }
        let exhausted = event.venue_left == 0;
        write_offers(lock, event_id, &made, offer_ttl).await?;
        offers.extend(made.iter().map(|(entry, decision)| Offer {
            entry_id: entry.id,
            order_id: decision.order_id,
            user_id: entry.user_id,
            quantity: i64::from(entry.quantity),
        }));
        if exhausted || (waiting.len() as i64) < PAGE {
            break;
        }
    }
    if !offers.is_empty() {
        tracing::info!(%event_id, offers = offers.len(), "released tickets offered to the waiting list");
        metrics::counter!("turnstile_waitlist_offers_total").increment(offers.len() as u64);
    }
    Ok(offers)
}

/// Writes the offers: an order per entry, made `QUEUED` and moved at once by its decision
/// (to `PENDING` with its hold, or `PAID` when it costs nothing), its tickets
/// ([`tickets::issue`]), and the entries `OFFERED`. The orders' history (a trigger) makes
/// them `order.pending` events and webhooks.
async fn write_offers(
    lock: &mut EventLock<'_>,
    event_id: Uuid,
    made: &[(&Waiting, Decision)],
    offer_ttl: Duration,
) -> sqlx::Result<()> {
    if made.is_empty() {
        return Ok(());
    }
    let mut columns = OfferColumns::default();
    let mut issued = Tickets::default();
    for (entry, decision) in made {
        let Some(status) = decision.moves_to() else { continue };
        let line = OrderLine {
            ticket_type_id: entry.ticket_type_id,
            name: entry.type_name.clone(),
            quantity: entry.quantity,
            unit_price: entry.unit_price(),
            list_price: entry.promo_code_id.map(|_| entry.price),
        };
        columns.orders.push(decision.order_id);
        columns.entries.push(entry.id);
        columns.users.push(entry.user_id);
        columns.quantities.push(entry.quantity);
        columns.prices.push(line.unit_price);
        columns.totals.push(line.amount());
        columns.discounts.push(line.discount());
        columns.code_ids.push(entry.promo_code_id);
        columns.codes.push(entry.promo_code.clone());
        columns.currencies.push(entry.currency.clone());
        columns.statuses.push(status.as_str());
        let paid = status == OrderStatus::Paid;
        columns.reasons.push(if paid { reason::FREE_ORDER } else { reason::WAITLIST_OFFER });
        columns.lines.push(serde_json::to_string(&[line]).map_err(|err| sqlx::Error::Encode(Box::new(err)))?);
        issued.push(decision.order_id, event_id, entry.ticket_type_id, i64::from(entry.quantity), entry.promo_code_id);
    }
    sqlx::query!(
        "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, currency, status, reason, lines,
                             published_at, expires_at, discount, promo_code_id, promo_code, promo_uses)
         SELECT id, user_id, $1, quantity, unit_price, total, currency, status, reason, lines::json, now(),
                CASE WHEN status = 'PENDING' THEN now() + make_interval(secs => $11) END, discount, promo_code_id,
                promo_code, CASE WHEN promo_code_id IS NOT NULL THEN quantity ELSE 0 END
         FROM UNNEST($2::uuid[], $3::uuid[], $4::int4[], $5::numeric[], $6::numeric[], $7::text[], $8::text[],
                     $9::text[], $10::text[], $12::numeric[], $13::uuid[], $14::text[])
              AS u(id, user_id, quantity, unit_price, total, currency, status, reason, lines, discount, promo_code_id,
                   promo_code)",
        event_id,
        &columns.orders,
        &columns.users,
        &columns.quantities,
        &columns.prices,
        &columns.totals,
        &columns.currencies,
        &columns.statuses as &[&str],
        &columns.reasons as &[&str],
        &columns.lines,
        offer_ttl.as_secs_f64(),
        &columns.discounts,
        &columns.code_ids as &[Option<Uuid>],
        &columns.codes as &[Option<String>]
    )
    .execute(lock.conn())
    .await?;
    tickets::issue(lock, &issued).await?;
    sqlx::query!(
        "UPDATE waitlist_entries w SET status = 'OFFERED', order_id = u.order_id, updated_at = now()
         FROM UNNEST($1::uuid[], $2::uuid[]) AS u(id, order_id) WHERE w.id = u.id",
        &columns.entries,
        &columns.orders
    )
    .execute(lock.conn())
    .await?;
    crate::db::notify_order_changes(lock.conn(), &columns.orders).await
}

/// The offers' columns, for the statements' `UNNEST`.
#[derive(Default)]
struct OfferColumns {
    orders: Vec<Uuid>,
    entries: Vec<Uuid>,
    users: Vec<Uuid>,
    quantities: Vec<i32>,
    prices: Vec<Decimal>,
    totals: Vec<Decimal>,
    currencies: Vec<String>,
    statuses: Vec<&'static str>,
    reasons: Vec<&'static str>,
    lines: Vec<String>,
    discounts: Vec<Decimal>,
    code_ids: Vec<Option<Uuid>>,
    codes: Vec<Option<String>>,
}
