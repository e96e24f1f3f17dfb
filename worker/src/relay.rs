//! The order events relay: the status changes are the outbox of order events (an accepted
//! order's own `QUEUED` change and the worker's decision on its row, every later one in
//! `order_history`; migrations `0022_queued_event_in_order.sql` and
//! `0026_decision_in_order.sql`). Each change is
//! published to the `orders.events` topic exchange (persistent, with publisher confirms)
//! and turned into one webhook delivery per enabled endpoint of the order's owner, and only
//! then the relay's cursor (`relay_cursor`) moved past it, all in one transaction. A broker
//! blip after a status change therefore delays its event but never loses it; a crash
//! between publish and commit publishes it again (consumers drop duplicates by `id`).
//!
//! The cursor runs over the changes in the order of (the id of the transaction that made
//! the change, the change's id), and the relay reads only changes of transactions older
//! than every one still running, which are final: none can appear behind the cursor later
//! (migration `0021_relay_cursor.sql` says why an id alone would not do). So a write
//! transaction left open anywhere in the database cluster holds the relay back until it
//! ends.
//!
//! One relay runs at a time across all workers (a transaction-scoped advisory lock), which
//! keeps each order's events in the order of its changes.
//!
//! By default (`ORDER_EVENTS_FORMAT=batch`) the events of a round that share a type travel
//! in one message, `{"version": 2, "type": "order.pending", "events": [<version 1 event>,
//! …]}`, routed by that type: a persistent, confirmed message costs the broker about the
//! same whatever it carries, and a stampede's round holds hundreds of events. The messages
//! are formed so that each order's events still arrive in the order of its changes (an
//! event joins a message only if that message comes after every earlier event of its
//! order). `single` sends one version 1 event per message.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use common::amqp::{CONFIRM_TIMEOUT, ConfirmChannel, ORDER_EVENTS_EXCHANGE};
use common::config::EventsFormat;
use common::domain::OrderStatus;
use common::notifications::{OrderNotification, OrderSnapshot};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::value::RawValue;
use sqlx::PgPool;
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::poll::{Next, Round, Steps};

/// Status changes relayed per transaction.
const BATCH: i64 = 500;
/// The advisory lock that makes the relay a singleton (an arbitrary, fixed number).
const RELAY_LOCK: i64 = 0x7475_726e_7374_696c;

struct Change {
    history_id: i64,
    /// The transaction that made the change (`xid8`, as text).
    xid: String,
    at: DateTime<Utc>,
    order: OrderSnapshot,
}

/// Relays new status changes every `interval` until shutdown.
pub async fn run(
    db: PgPool,
    channel: ConfirmChannel,
    interval: Duration,
    format: EventsFormat,
    steps: Steps,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut relay = Relay { db, channel, format, failed: false };
    crate::poll::every("order events relay", interval, &shutdown, &mut relay, steps).await
}

impl Round for Relay {
    async fn round(&mut self) -> anyhow::Result<Next> {
        let relayed = self.batch().await?;
        Ok(if relayed < BATCH as usize { Next::Wait } else { Next::Again })
    }

    fn failed(&mut self) {
        self.failed = true;
    }
}

struct Relay {
    db: PgPool,
    /// Kept across batches.
    channel: ConfirmChannel,
    format: EventsFormat,
    /// The last round failed: its channel is reset before the next publish.
    failed: bool,
}

impl Relay {
    #[tracing::instrument(name = "relay batch", skip_all, err(level = "warn"))]
    async fn batch(&mut self) -> anyhow::Result<usize> {
        let mut tx = self.db.begin().await?;
        let leader = sqlx::query_scalar!(r#"SELECT pg_try_advisory_xact_lock($1) AS "leader!""#, RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !leader {
            return Ok(0);
        }
        let changes = changes(&mut tx).await?;
        // How far behind the relay is: the age of the oldest change not yet relayed.
        let lag = changes.first().map_or(0.0, |c| (Utc::now() - c.at).to_std().unwrap_or_default().as_secs_f64());
        metrics::gauge!("turnstile_relay_lag_seconds").set(lag);
        if changes.is_empty() {
            return Ok(0);
        }
        let last = changes.last().map(|c| (c.xid.clone(), c.history_id));
        let notifications: Vec<OrderNotification> =
            changes.into_iter().map(|c| OrderNotification::new(c.history_id, c.at, c.order)).collect();
        let payloads: Vec<String> =
            notifications.iter().map(serde_json::to_string).collect::<Result<_, _>>().context("serialising events")?;

        self.publish(&notifications, &payloads).await?;
        create_deliveries(&mut tx, &notifications, &payloads).await?;
        if let Some((xid, history_id)) = last {
            sqlx::query!("UPDATE relay_cursor SET xid = $1::text::xid8, history_id = $2", xid, history_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        metrics::counter!("turnstile_order_events_published_total").increment(notifications.len() as u64);
        Ok(notifications.len())
    }

    /// Publishes every event, then waits for all the broker's confirms.
    async fn publish(&mut self, notifications: &[OrderNotification], payloads: &[String]) -> anyhow::Result<()> {
        let messages = match self.format {
            EventsFormat::Batch => batches(notifications, payloads),
            EventsFormat::Single => notifications
                .iter()
                .zip(payloads)
                .map(|(notification, payload)| Message { first: notification, body: payload.clone().into_bytes() })
                .collect(),
        };
        let channel = self.channel().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for message in &messages {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(message.first.id.as_str().into())
                .with_type(message.first.kind.as_str().into())
                .with_timestamp(u64::try_from(message.first.timestamp.timestamp()).unwrap_or_default());
            let confirm = channel
                .basic_publish(
                    ORDER_EVENTS_EXCHANGE.into(),
                    message.first.kind.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    properties,
                )
                .await?;
            confirms.push(confirm);
        }
        let sent = confirms.len() as u64;
        tokio::time::timeout(CONFIRM_TIMEOUT, async {
            for confirm in confirms {
                match confirm.await? {
                    Confirmation::Nack(_) => anyhow::bail!("the broker refused an order event"),
                    Confirmation::NotRequested => anyhow::bail!("channel is not in confirm mode"),
                    Confirmation::Ack(_) => {}
                }
            }
            metrics::counter!("turnstile_order_event_messages_published_total").increment(sent);
            Ok(())
        })
        .await
        .context("waiting for the broker's confirms")?
    }

    async fn channel(&mut self) -> anyhow::Result<Channel> {
        if std::mem::take(&mut self.failed) {
            self.channel.reset().await;
        }
        Ok(self.channel.get().await?)
    }
}

/// The changes past the cursor, oldest first, at most [`BATCH`]: the orders' own `QUEUED`
/// changes (migration 0022) and decisions (0026) and the history's, merged in the cursor's
/// order.
async fn changes(conn: &mut sqlx::PgConnection) -> sqlx::Result<Vec<Change>> {
    // Read apart, so the changes' statement finds its place in the index from parameters.
    let cursor =
        sqlx::query!(r#"SELECT xid::text AS "xid!", history_id FROM relay_cursor"#).fetch_one(&mut *conn).await?;
    // The same changes as the view `order_status_changes` (migration 0026), written out:
    // through the view's `UNION ALL` the planner reads the orders' branch by a sequential
    // scan and a sort, not in the index's order (0.9 s against 1 ms under a million orders).
    let changes = sqlx::query!(
        r#"SELECT c.history_id AS "history_id!", c.at AS "at!", c.id AS "id!", c.user_id AS "user_id!",
                c.event_id AS "event_id!", c.quantity AS "quantity!", c.unit_price, c.total AS "total!",
                c.currency AS "currency!", c.lines AS "items!: Json<Box<RawValue>>", c.promo_code,
                c.discount AS "discount!", c.status AS "status!: OrderStatus", c.reason, c.reason_ticket_type_id,
                c.created_at AS "created_at!", c.expires_at, c.queue_number, c.xid::text AS "xid!"
         FROM (
             -- An order the api accepted is its own QUEUED change (migration 0022): read from
             -- its row alone.
             (SELECT q.queued_event_id AS history_id, q.created_at AS at, q.id, q.user_id, q.event_id, q.quantity,
                     q.unit_price, q.total, q.currency, q.lines, q.promo_code, q.discount, 'QUEUED' AS status,
                     NULL::text AS reason, NULL::uuid AS reason_ticket_type_id, q.created_at,
                     NULL::timestamptz AS expires_at, q.queue_number, q.queued_xid AS xid
              FROM orders q
              WHERE q.queued_event_id IS NOT NULL AND (q.queued_xid, q.queued_event_id) > ($2::text::xid8, $3)
                AND q.queued_xid < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY q.queued_xid, q.queued_event_id LIMIT $1)
             UNION ALL
             -- The worker's decision is carried on the row too (migration 0026).
             (SELECT d.decided_event_id, d.decided_at, d.id, d.user_id, d.event_id, d.quantity, d.unit_price,
                     d.total, d.currency, d.lines, d.promo_code, d.discount, d.decided_status, d.decided_reason,
                     CASE WHEN d.decided_status = 'REJECTED' THEN d.reason_ticket_type_id END, d.created_at,
                     d.expires_at, d.queue_number, d.decided_xid
              FROM orders d
              WHERE d.decided_event_id IS NOT NULL AND (d.decided_xid, d.decided_event_id) > ($2::text::xid8, $3)
                AND d.decided_xid < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY d.decided_xid, d.decided_event_id LIMIT $1)
             UNION ALL
             (SELECT h.id, h.at, o.id, o.user_id, o.event_id, o.quantity, o.unit_price, o.total, o.currency, o.lines,
                     o.promo_code, o.discount, h.status, h.reason,
                     CASE WHEN h.status = 'REJECTED' THEN o.reason_ticket_type_id END, o.created_at,
                     -- The hold's end belongs to the PENDING event; a QUEUED one predates it.
                     CASE WHEN h.status <> 'QUEUED' THEN o.expires_at END, o.queue_number, h.xid
              FROM order_history h JOIN orders o ON o.id = h.order_id
              WHERE (h.xid, h.id) > ($2::text::xid8, $3) AND h.xid < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY h.xid, h.id LIMIT $1)
         ) c
         ORDER BY c.xid, c.history_id LIMIT $1"#,
        BATCH,
        cursor.xid,
        cursor.history_id
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| Change {
        history_id: row.history_id,
        xid: row.xid,
        at: row.at,
        order: OrderSnapshot {
            id: row.id,
            user_id: row.user_id,
            event_id: row.event_id,
            quantity: row.quantity,
            unit_price: row.unit_price,
            total: row.total,
            currency: row.currency,
            items: row.items.0,
            promo_code: row.promo_code,
            discount: row.discount,
            status: row.status,
            reason: row.reason,
            reason_ticket_type_id: row.reason_ticket_type_id,
            created_at: row.created_at,
            expires_at: row.expires_at,
            queue_number: row.queue_number,
        },
    })
    .collect();
    Ok(changes)
}

/// One message for `orders.events`: its first event gives its routing key and properties.
struct Message<'a> {
    first: &'a OrderNotification,
    body: Vec<u8>,
}

/// The round's events as version 2 messages, each holding events of one type, as few as
/// keep every order's events in order: an event joins the last message of its type only if
/// that message comes after every message holding an earlier event of the same order;
/// otherwise it starts a new one at the end.
fn batches<'a>(notifications: &'a [OrderNotification], payloads: &[String]) -> Vec<Message<'a>> {
    let mut groups: Vec<(&'a OrderNotification, Vec<&str>)> = Vec::new();
    let mut last_of_order: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    for (notification, payload) in notifications.iter().zip(payloads) {
        let after = last_of_order.get(&notification.data.id).copied();
        let joinable = groups
            .iter()
            .rposition(|(first, _)| first.kind == notification.kind)
            .filter(|position| after.is_none_or(|after| *position > after));
        let position = match joinable {
            Some(position) => position,
            None => {
                groups.push((notification, Vec::new()));
                groups.len() - 1
            }
        };
        groups[position].1.push(payload);
        last_of_order.insert(notification.data.id, position);
    }
    groups
        .into_iter()
        .map(|(first, payloads)| {
            let body = format!(
                r#"{{"version":{},"type":{},"events":[{}]}}"#,
                common::notifications::BATCH_VERSION,
                serde_json::Value::from(first.kind.as_str()),
                payloads.join(",")
            );
            Message { first, body: body.into_bytes() }
        })
        .collect()
}

/// One delivery per (change, enabled endpoint of the order's owner), due now.
async fn create_deliveries(
    tx: &mut sqlx::PgConnection,
    notifications: &[OrderNotification],
    payloads: &[String],
) -> sqlx::Result<()> {
    let owners: Vec<Uuid> = notifications.iter().map(|n| n.data.user_id).collect();
    let endpoints: Vec<(Uuid, Uuid)> =
        sqlx::query!("SELECT id, user_id FROM webhook_endpoints WHERE enabled AND user_id = ANY($1)", &owners)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|row| (row.id, row.user_id))
            .collect();
    if endpoints.is_empty() {
        return Ok(());
    }
    let (mut ids, mut endpoint_ids, mut order_ids, mut types, mut bodies) = (vec![], vec![], vec![], vec![], vec![]);
    for (notification, payload) in notifications.iter().zip(payloads) {
        for (endpoint, _) in endpoints.iter().filter(|(_, owner)| *owner == notification.data.user_id) {
            ids.push(Uuid::now_v7());
            endpoint_ids.push(*endpoint);
            order_ids.push(notification.data.id);
            types.push(notification.kind.as_str());
            bodies.push(payload.as_str());
        }
    }
    sqlx::query!(
        "INSERT INTO webhook_deliveries (id, endpoint_id, order_id, event_type, payload, next_attempt_at)
         SELECT d.id, d.endpoint_id, d.order_id, d.event_type, d.payload, now()
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
              AS d(id, endpoint_id, order_id, event_type, payload)",
        &ids,
        &endpoint_ids,
        &order_ids,
        &types as &[&str],
        &bodies as &[&str]
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::domain::OrderStatus;
    use common::notifications::OrderSnapshot;

    fn event(history_id: i64, order: u128, status: OrderStatus) -> OrderNotification {
        let snapshot = OrderSnapshot {
            id: Uuid::from_u128(order),
            user_id: Uuid::from_u128(99),
            event_id: Uuid::from_u128(98),
            quantity: 1,
            unit_price: Some(rust_decimal::Decimal::ONE),
            total: rust_decimal::Decimal::ONE,
            currency: "EUR".to_owned(),
            items: serde_json::value::RawValue::from_string("[]".to_owned()).unwrap(),
            promo_code: None,
            discount: rust_decimal::Decimal::ZERO,
            status,
            reason: None,
            reason_ticket_type_id: None,
            created_at: chrono::Utc::now(),
            expires_at: None,
            queue_number: Some(1),
        };
        OrderNotification::new(history_id, chrono::Utc::now(), snapshot)
    }

    /// (type, history ids) of each message.
    fn shape(notifications: &[OrderNotification]) -> Vec<(String, Vec<i64>)> {
        let payloads: Vec<String> = notifications.iter().map(|n| serde_json::to_string(n).unwrap()).collect();
        batches(notifications, &payloads)
            .into_iter()
            .map(|message| {
                let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
                assert_eq!(body["version"], 2);
                assert_eq!(body["type"], message.first.kind.as_str());
                let ids = body["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        assert_eq!(e["type"], body["type"], "one type per message");
                        e["id"].as_str().unwrap().trim_start_matches("evt_").parse().unwrap()
                    })
                    .collect();
                (message.first.kind.clone(), ids)
            })
            .collect()
    }

    #[test]
    fn events_of_a_type_share_a_message() {
        use OrderStatus::*;
        let round = [event(1, 1, Queued), event(2, 2, Queued), event(3, 3, Queued), event(4, 1, Pending)];
        assert_eq!(shape(&round), [("order.queued".into(), vec![1, 2, 3]), ("order.pending".into(), vec![4])]);
    }

    #[test]
    fn each_orders_events_stay_in_the_order_of_its_changes() {
        use OrderStatus::*;
        // Order 2's PENDING may not join the PENDING message that precedes its QUEUED one.
        let round = [event(1, 1, Pending), event(2, 2, Queued), event(3, 2, Pending), event(4, 3, Pending)];
        let messages = shape(&round);
        assert_eq!(
            messages,
            [("order.pending".into(), vec![1]), ("order.queued".into(), vec![2]), ("order.pending".into(), vec![3, 4])]
        );
        // Whatever the round, every order's events appear in history order across messages.
        let statuses = [Queued, Pending, Paid, Rejected, Expired, Cancelled];
        let round: Vec<OrderNotification> =
            (0..60).map(|i| event(i, (i * 7 % 5) as u128, statuses[(i * 3 % 6) as usize])).collect();
        let flat: Vec<i64> = shape(&round).into_iter().flat_map(|(_, ids)| ids).collect();
        for order in 0..5u128 {
            let ids: Vec<i64> = flat.iter().copied().filter(|id| (*id * 7 % 5) as u128 == order).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            assert_eq!(ids, sorted, "order {order}");
        }
        assert_eq!(flat.len(), 60);
    }
}
