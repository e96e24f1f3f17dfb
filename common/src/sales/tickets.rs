//! Tickets issued and released, with the `sold` counters that follow them: the only
//! statements that change `sold` and promo codes' `uses`, for the allocator, the waiting list
//! and every release alike. (A sale is not an edit: an event's `updated_at` does not move
//! with `sold`.) A ticket carries its type and the promo code it was issued under, so a
//! release gives each type and each code back exactly what its tickets took.

use std::collections::HashMap;

use uuid::Uuid;

use super::EventLock;

/// Tickets to issue, one entry per ticket in each column (as they are inserted).
#[derive(Debug, Default)]
pub struct Tickets {
    pub ids: Vec<Uuid>,
    pub orders: Vec<Uuid>,
    pub events: Vec<Uuid>,
    pub types: Vec<Uuid>,
    /// The promo code each is issued under (one use of it each), if any.
    pub codes: Vec<Option<Uuid>>,
}

impl Tickets {
    /// `quantity` tickets of a type for an order, under a promo code or not.
    pub fn push(&mut self, order_id: Uuid, event_id: Uuid, type_id: Uuid, quantity: i64, code: Option<Uuid>) {
        for _ in 0..quantity {
            self.ids.push(Uuid::now_v7());
            self.orders.push(order_id);
            self.events.push(event_id);
            self.types.push(type_id);
            self.codes.push(code);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// How many tickets each event gets.
    pub fn per_event(&self) -> HashMap<Uuid, i64> {
        count(&self.events)
    }

    /// How many tickets each ticket type gets.
    pub fn per_type(&self) -> HashMap<Uuid, i64> {
        count(&self.types)
    }

    /// How many uses each promo code gets.
    pub fn per_code(&self) -> HashMap<Uuid, i64> {
        count(self.codes.iter().flatten())
    }
}

fn count<'a>(ids: impl IntoIterator<Item = &'a Uuid>) -> HashMap<Uuid, i64> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

/// Issues the tickets and raises their types' and events' `sold`, and their codes' `uses`, by
/// as many, in one statement. Every event named must be held by `lock`.
pub async fn issue(lock: &mut EventLock<'_>, tickets: &Tickets) -> sqlx::Result<()> {
    write(lock, tickets, true).await
}

/// [`issue`] for the allocator's decisions, which raise their events' `sold` in the statement
/// that moves their orders (so each event row is updated once per batch).
pub(super) async fn issue_for_orders(lock: &mut EventLock<'_>, tickets: &Tickets) -> sqlx::Result<()> {
    write(lock, tickets, false).await
}

async fn write(lock: &mut EventLock<'_>, tickets: &Tickets, events_sold: bool) -> sqlx::Result<()> {
    if tickets.is_empty() {
        return Ok(());
    }
    let (mut events, mut event_counts): (Vec<Uuid>, Vec<i64>) = tickets.per_event().into_iter().unzip();
    for event_id in &events {
        lock.check_holds(*event_id)?;
    }
    if !events_sold {
        events.clear();
        event_counts.clear();
    }
    let (types, type_counts): (Vec<Uuid>, Vec<i64>) = tickets.per_type().into_iter().unzip();
    let (codes, code_counts): (Vec<Uuid>, Vec<i64>) = tickets.per_code().into_iter().unzip();
    sqlx::query!(
        "WITH issued AS (
             INSERT INTO tickets (id, order_id, event_id, ticket_type_id, promo_code_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $9::uuid[])
         ),
         types AS (
             UPDATE ticket_types t SET sold = t.sold + s.issued
             FROM UNNEST($7::uuid[], $8::int8[]) AS s(id, issued) WHERE t.id = s.id
         ),
         codes AS (
             UPDATE promo_codes c SET uses = c.uses + s.issued
             FROM UNNEST($10::uuid[], $11::int8[]) AS s(id, issued) WHERE c.id = s.id
         )
         UPDATE events e SET sold = e.sold + s.issued
         FROM UNNEST($5::uuid[], $6::int8[]) AS s(id, issued) WHERE e.id = s.id",
        &tickets.ids,
        &tickets.orders,
        &tickets.events,
        &tickets.types,
        &events,
        &event_counts,
        &types,
        &type_counts,
        &tickets.codes as &[Option<Uuid>],
        &codes,
        &code_counts
    )
    .execute(lock.conn())
    .await?;
    Ok(())
}

/// Cancels the active tickets of these orders of one locked event and gives them back to
/// their types' and the event's `sold` and their codes' `uses`, counted from the tickets
/// cancelled (one statement).
pub async fn release(lock: &mut EventLock<'_>, event_id: Uuid, order_ids: &[Uuid]) -> sqlx::Result<()> {
    lock.check_holds(event_id)?;
    sqlx::query!(
        "WITH cancelled AS (
             UPDATE tickets SET status = 'CANCELLED' WHERE order_id = ANY($1) AND status = 'ACTIVE'
             RETURNING ticket_type_id, promo_code_id
         ),
         per_type AS (SELECT ticket_type_id AS id, count(*) AS released FROM cancelled GROUP BY 1),
         types AS (UPDATE ticket_types t SET sold = t.sold - p.released FROM per_type p WHERE t.id = p.id),
         codes AS (
             UPDATE promo_codes c SET uses = c.uses - p.released
             FROM (SELECT promo_code_id AS id, count(*) AS released FROM cancelled
                   WHERE promo_code_id IS NOT NULL GROUP BY 1) p
             WHERE c.id = p.id
         )
         UPDATE events SET sold = sold - (SELECT coalesce(sum(released), 0) FROM per_type)
         WHERE id = $2",
        order_ids,
        event_id
    )
    .execute(lock.conn())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_event_and_type() {
        let (order, event, ga, vip) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4));
        let mut tickets = Tickets::default();
        let code = Uuid::from_u128(5);
        tickets.push(order, event, ga, 2, None);
        tickets.push(order, event, vip, 1, Some(code));
        tickets.push(order, event, vip, 0, Some(code));
        assert_eq!(tickets.ids.len(), 3);
        assert_eq!(tickets.per_event(), HashMap::from([(event, 3)]));
        assert_eq!(tickets.per_type(), HashMap::from([(ga, 2), (vip, 1)]));
        assert_eq!(tickets.per_code(), HashMap::from([(code, 1)]));
        assert_eq!(tickets.codes, [None, None, Some(code)]);
        assert_eq!(tickets.orders, [order; 3]);
    }
}
