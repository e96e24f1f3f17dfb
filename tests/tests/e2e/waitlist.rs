//! After the sell-out, end to end with real processes: waiting lists served from released
//! tickets in join order (exact counts), offers that lapse and pass on, refunds (by the
//! provider, by an admin, of a checked-in ticket) under a stampede and a waiting list, and
//! an event deleted with refunds whose api is killed midway.

use std::time::Duration;

use common::config::WorkerConfig;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::{Response, TestApp, worker_decides};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

/// The tests' short expiry interval, and holds that do not run out on their own.
const EXPIRY_INTERVAL_MS: u64 = 100;
const HOLD_TTL_SECS: u64 = 3600;

/// Those settings for the worker process of the test that kills it.
fn worker_env() -> Vec<(&'static str, String)> {
    vec![("EXPIRY_INTERVAL_MS", EXPIRY_INTERVAL_MS.to_string()), ("HOLD_TTL_SECS", HOLD_TTL_SECS.to_string())]
}

/// The same, for workers in the test's process.
fn worker_settings(config: &mut WorkerConfig) {
    (config.expiry_interval_ms, config.hold_ttl_secs) = (EXPIRY_INTERVAL_MS, HOLD_TTL_SECS);
}

async fn join(app: &TestApp, token: &str, event: Uuid, body: Value) -> Response {
    app.post(&format!("/api/v1/events/{event}/waitlist"), &body, Some(token)).await
}

/// Ends the holds of these orders now, in one statement, so the expiry loop releases them
/// in one transaction.
async fn end_holds(app: &TestApp, orders: &[Uuid]) {
    sqlx::query("UPDATE orders SET expires_at = now() - interval '1 second' WHERE id = ANY($1)")
        .bind(orders)
        .execute(&app.db.pool)
        .await
        .unwrap();
}

/// (entry id, status, quantity, order id) of the event's entries, in join order.
async fn entries(app: &TestApp, event: Uuid) -> Vec<(Uuid, String, i32, Option<Uuid>)> {
    sqlx::query_as("SELECT id, status, quantity, order_id FROM waitlist_entries WHERE event_id = $1 ORDER BY id")
        .bind(event)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

/// The entries the offers should go to: in join order, each that fits what is left.
fn greedy(waiting: &[(Uuid, i32)], mut left: i32) -> Vec<Uuid> {
    let mut offered = Vec::new();
    for (id, quantity) in waiting {
        if *quantity <= left {
            left -= quantity;
            offered.push(*id);
        }
    }
    offered
}

#[tokio::test]
async fn released_tickets_go_to_the_waiting_list_in_join_order_and_lapsed_offers_pass_on() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let worker = app.worker_with(worker_settings).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 20, 4).await;
    let holders = app.buyers(10).await;
    let holds = join_all(holders.iter().map(|(_, token)| app.pending_order(token, event, 2))).await;

    // 30 entries of mixed quantities join the sold-out event, one after the other.
    let waiters = app.buyers(30).await;
    let quantities: Vec<i32> = (0..30).map(|i| [3, 4, 1, 2, 4, 4, 3, 1, 2, 4][i % 10]).collect();
    for ((_, token), quantity) in waiters.iter().zip(&quantities) {
        let res = join(&app, token, event, json!({"quantity": quantity})).await;
        assert_eq!(res.status, 201, "{}", res.body);
        assert_eq!(res.json["status"], "WAITING");
    }
    let listed = app.get(&format!("/api/v1/events/{event}/waitlist?limit=100"), Some(&admin)).await;
    let positions: Vec<i64> = listed.json.as_array().unwrap().iter().map(|e| e["position"].as_i64().unwrap()).collect();
    assert_eq!(positions, (1..=30).collect::<Vec<_>>());

    // The 10 holds (20 tickets) run out at once: the offers go in join order to the entries
    // that fit, never more than released.
    end_holds(&app, &holds).await;
    let ids: Vec<(Uuid, i32)> = entries(&app, event).await.iter().map(|(id, _, q, _)| (*id, *q)).collect();
    let expected = greedy(&ids, 20);
    // One round of the expiry loop, begun after the holds ended: it releases them and
    // makes the offers in one transaction.
    assert!(worker.steps().expiry().await);
    let after = entries(&app, event).await;
    let offered: Vec<Uuid> = after.iter().filter(|e| e.1 == "OFFERED").map(|e| e.0).collect();
    assert_eq!(offered, expected, "offers in join order to the entries that fit");
    let offered_tickets: i32 = after.iter().filter(|e| e.1 == "OFFERED").map(|e| e.2).sum();
    assert!(offered_tickets <= 20);
    let (_, sold) = app.assert_consistent(event).await;
    assert_eq!(sold, i64::from(offered_tickets), "only the offers hold tickets now");

    // Each offer is an order of the buyer's own, PENDING with reason WAITLIST_OFFER.
    let first = after.iter().find(|e| e.1 == "OFFERED").unwrap();
    let first_buyer = &waiters[ids.iter().position(|(id, _)| *id == first.0).unwrap()].1;
    let order = app.get(&format!("/api/v1/orders/{}", first.3.unwrap()), Some(first_buyer)).await;
    assert_eq!(
        (order.json["status"].as_str(), order.json["reason"].as_str()),
        (Some("PENDING"), Some("WAITLIST_OFFER"))
    );
    assert_eq!(order.json["quantity"], first.2);
    let mine = app.get("/api/v1/me/waitlist", Some(first_buyer)).await;
    assert_eq!(mine.json[0]["status"], "OFFERED");
    assert_eq!(mine.json[0]["order_id"], order.json["id"]);
    // An entry holding an offer is not left by DELETE: the order is paid or cancelled.
    app.delete(&format!("/api/v1/events/{event}/waitlist"), Some(first_buyer)).await.assert_error(409, "offer_pending");

    // The first offer lapses: its tickets pass on to the next entries that fit.
    end_holds(&app, &[first.3.unwrap()]).await;
    let waiting: Vec<(Uuid, i32)> = after.iter().filter(|e| e.1 == "WAITING").map(|e| (e.0, e.2)).collect();
    let expected_next = greedy(&waiting, 20 - offered_tickets + first.2);
    assert!(worker.steps().expiry().await);
    let now = entries(&app, event).await;
    assert_eq!(now.iter().find(|e| e.0 == first.0).map(|e| e.1.as_str()), Some("LAPSED"));
    let newly: Vec<Uuid> = now.iter().filter(|e| e.1 == "OFFERED" && !offered.contains(&e.0)).map(|e| e.0).collect();
    assert_eq!(newly, expected_next);
    app.assert_consistent(event).await;

    // Paying an offer makes the entry PURCHASED; cancelling one passes it on like a lapse.
    let second = now.iter().find(|e| e.1 == "OFFERED").unwrap();
    assert_eq!(app.payment(second.3.unwrap(), &json!({"status": "PAID"})).await.status, 204);
    let status: String = sqlx::query_scalar("SELECT status FROM waitlist_entries WHERE id = $1")
        .bind(second.0)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "PURCHASED");
    app.wait_until_final(SETTLE).await;
    app.assert_consistent(event).await;
}

#[tokio::test]
async fn joining_and_leaving_the_waiting_list_are_checked() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(worker_settings).await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 2, 4).await;
    let path = format!("/api/v1/events/{event}/waitlist");

    // Tickets to be had: buy them instead.
    let res = join(&app, &buyer, event, json!({"quantity": 2})).await;
    res.assert_error(409, "tickets_available");
    assert!(res.json["error"]["message"].as_str().unwrap().contains("POST /api/v1/orders"), "{}", res.body);
    // More than is left may wait.
    app.pending_order(&app.buyers(1).await[0].1, event, 1).await;
    let res = join(&app, &buyer, event, json!({"quantity": 2})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.header("location"), Some("/api/v1/me/waitlist"));
    join(&app, &buyer, event, json!({"quantity": 1})).await.assert_error(409, "already_waiting");

    // Refusals.
    app.post(&path, &json!({"quantity": 1}), None).await.assert_error(401, "unauthorized");
    join(&app, &buyer, Uuid::now_v7(), json!({"quantity": 1})).await.assert_error(404, "not_found");
    let (_, other) = app.user("Other").await;
    for quantity in [0, 5] {
        join(&app, &other, event, json!({"quantity": quantity})).await.assert_error(422, "invalid_quantity");
    }
    let unknown = json!({"quantity": 1, "ticket_type_id": Uuid::now_v7()});
    join(&app, &other, event, unknown).await.assert_error(422, "unknown_ticket_type");
    join(&app, &other, event, json!({"quantity": "two"})).await.assert_error(422, "invalid_body");
    join(&app, &other, event, json!({"quantity": 1, "extra": true})).await.assert_error(422, "invalid_body");
    app.get(&path, Some(&buyer)).await.assert_error(403, "forbidden");
    app.get(&path, None).await.assert_error(401, "unauthorized");
    app.get(&format!("/api/v1/events/{}/waitlist", Uuid::now_v7()), Some(&admin)).await.assert_error(404, "not_found");
    app.get(&format!("{path}?limit=0"), Some(&admin)).await.assert_error(400, "invalid_query");
    app.get("/api/v1/me/waitlist", None).await.assert_error(401, "unauthorized");

    // A buyer has at most 50 open entries at once (the first 50 written directly, on events
    // of their own).
    let (crowded, crowded_token) = app.user("Crowded").await;
    let fillers: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO events (id, name, location, organization, starts_at, capacity, price)
         SELECT gen_random_uuid(), 'Filler', 'Hall', 'Org', now() + interval '30 days', 1, 1 FROM generate_series(1, 50)
         RETURNING id",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO waitlist_entries (id, event_id, ticket_type_id, user_id, quantity)
         SELECT gen_random_uuid(), id, default_ticket_type_id, $2, 1 FROM events WHERE id = ANY($1)",
    )
    .bind(&fillers)
    .bind(crowded)
    .execute(&app.db.pool)
    .await
    .unwrap();
    join(&app, &crowded_token, event, json!({"quantity": 2})).await.assert_error(409, "too_many_entries");

    // Leaving: once, then there is nothing to leave.
    assert_eq!(app.delete(&path, Some(&buyer)).await.status, 204);
    app.delete(&path, Some(&buyer)).await.assert_error(404, "not_found");
    let mine = app.get("/api/v1/me/waitlist", Some(&buyer)).await;
    assert_eq!(mine.json[0]["status"], "LEFT", "{}", mine.body);
    assert!(mine.json[0]["position"].is_null());
    // Having left, the buyer may join again, at the back.
    assert_eq!(join(&app, &buyer, event, json!({"quantity": 2})).await.status, 201);

    // Capacity raised: the waiting list is served before the sale.
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"capacity": 3}), Some(&admin)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json["tickets_available"], 0, "the 2 tickets left went to the waiting entry: {}", res.body);
    let mine = app.get("/api/v1/me/waitlist", Some(&buyer)).await;
    assert_eq!((mine.json[0]["status"].as_str(), mine.json[0]["quantity"].as_i64()), (Some("OFFERED"), Some(2)));
    app.assert_consistent(event).await;
}

/// Pays these orders through the provider's webhook, a few at a time.
async fn pay_all(app: &TestApp, orders: &[Uuid]) {
    for chunk in orders.chunks(25) {
        let paid = json!({"status": "PAID"});
        for res in join_all(chunk.iter().map(|order| app.payment(*order, &paid))).await {
            assert_eq!(res.status, 204, "{}", res.body);
        }
    }
}

#[tokio::test]
async fn refunds_under_a_stampede_and_a_waiting_list_never_oversell() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(worker_settings).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 50, 4).await;
    let buyers = app.buyers(50).await;
    let orders = join_all(buyers.iter().map(|(_, token)| app.pending_order(token, event, 1))).await;
    pay_all(&app, &orders[..20]).await;

    // 20 entries of 1 ticket wait: more than the refunds below release.
    let waiters = app.buyers(20).await;
    for (_, token) in &waiters {
        assert_eq!(join(&app, token, event, json!({"quantity": 1})).await.status, 201);
    }

    // A checked-in ticket can be refunded: it is cancelled, its check-in stays on record.
    let detail = app.get(&format!("/api/v1/orders/{}", orders[0]), Some(&buyers[0].1)).await;
    let code = detail.json["tickets"][0]["code"].as_str().unwrap().to_owned();
    assert_eq!(app.post("/api/v1/check-ins", &json!({"code": code}), Some(&admin)).await.status, 200);

    // A second stampede, 10 admin refunds and 5 provider refunds, all at once.
    let rushers = app.buyers(100).await;
    let stampede = join_all(rushers.iter().map(|(_, token)| app.order(token, event, 1, None)));
    let empty = json!({});
    let refund_paths: Vec<String> = orders[..10].iter().map(|order| format!("/api/v1/orders/{order}/refund")).collect();
    let admin_refunds = join_all(refund_paths.iter().map(|path| app.post(path, &empty, Some(&admin))));
    let refunded = json!({"status": "REFUNDED"});
    let provider_refunds = join_all(orders[10..15].iter().map(|order| app.payment(*order, &refunded)));
    let (stampede, admin_refunds, provider_refunds) = tokio::join!(stampede, admin_refunds, provider_refunds);
    assert!(stampede.iter().all(|res| res.status == 202), "every purchase is accepted");
    for res in &admin_refunds {
        assert_eq!(res.status, 200, "{}", res.body);
        assert_eq!((res.json["source"].as_str(), res.json["executed_at"].is_null()), (Some("ADMIN"), true));
    }
    assert!(provider_refunds.iter().all(|res| res.status == 204));
    app.wait_until_final(SETTLE).await;

    // Exactly 15 refunds, each order once; the 15 tickets went to the waiting list first.
    let (_, sold) = app.assert_consistent(event).await;
    assert_eq!(sold, 50, "every released ticket was taken again, never more");
    let refunded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o JOIN refunds r ON r.order_id = o.id WHERE o.event_id = $1 AND o.status = 'REFUNDED'",
    )
    .bind(event)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(refunded, 15);
    let offered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM waitlist_entries WHERE event_id = $1 AND status = 'OFFERED'")
            .bind(event)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(offered, 15, "the waiting list queued before the stampede: it gets the released tickets");
    let rush_won: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE event_id = $1 AND user_id = ANY($2) AND status = 'PENDING'",
    )
    .bind(event)
    .bind(rushers.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(rush_won, 0);

    // The checked-in ticket is cancelled; scanning it again says so.
    app.post("/api/v1/check-ins", &json!({"code": code}), Some(&admin)).await.assert_error(422, "ticket_cancelled");

    // Refund rules: admins only; paid orders only; again is the same refund; the provider's
    // report marks an admin's refund executed; the pending list shows what is owed.
    let path = format!("/api/v1/orders/{}/refund", orders[20]);
    app.post(&path, &json!({}), Some(&buyers[20].1)).await.assert_error(403, "forbidden");
    app.post(&path, &json!({}), None).await.assert_error(401, "unauthorized");
    app.post(&path, &json!({}), Some(&admin)).await.assert_error(409, "invalid_transition");
    app.post(&format!("/api/v1/orders/{}/refund", Uuid::now_v7()), &json!({}), Some(&admin))
        .await
        .assert_error(404, "not_found");
    let again = app.post(&format!("/api/v1/orders/{}/refund", orders[0]), &json!({}), Some(&admin)).await;
    assert_eq!(again.json, admin_refunds[0].json, "asking again answers the same refund");
    let pending = app.get("/api/v1/refunds?pending=true&limit=100", Some(&admin)).await;
    assert_eq!(pending.json.as_array().unwrap().len(), 10, "{}", pending.body);
    assert_eq!(app.payment(orders[0], &json!({"status": "REFUNDED"})).await.status, 204);
    let pending = app.get("/api/v1/refunds?pending=true&limit=100", Some(&admin)).await;
    assert_eq!(pending.json.as_array().unwrap().len(), 9);
    assert_eq!(app.get("/api/v1/refunds?limit=100", Some(&admin)).await.json.as_array().unwrap().len(), 15);
    app.get("/api/v1/refunds", Some(&buyers[0].1)).await.assert_error(403, "forbidden");
    app.get("/api/v1/refunds?pending=maybe", Some(&admin)).await.assert_error(400, "invalid_query");
    let history = app.get(&format!("/api/v1/orders/{}", orders[0]), Some(&buyers[0].1)).await;
    let statuses: Vec<&str> =
        history.json["history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["QUEUED", "PENDING", "PAID", "REFUNDED"]);
}

#[tokio::test]
async fn deleting_with_refunds_killed_midway_finishes_with_every_order_refunded_once() {
    let mut app = TestApp::spawn_process_with(&[
        ("SOLD_OUT_FAST_PATH", "false".to_owned()),
        ("QUEUE_DEMAND_FACTOR", "0".to_owned()),
        ("DELETION_REFUND_BATCH", "3".to_owned()),
    ])
    .await;
    let mut worker = app.spawn_worker(&worker_env());
    let admin = app.admin().await;
    let event = app.event_with(&admin, 300, 4).await;
    let buyers = app.buyers(300).await;
    let mut orders = Vec::new();
    for chunk in buyers.chunks(50) {
        orders.extend(join_all(chunk.iter().map(|(_, token)| app.pending_order(token, event, 1))).await);
    }
    pay_all(&app, &orders).await;
    // Without ?refund=true, paid orders refuse the deletion.
    let path = format!("/api/v1/events/{event}");
    app.delete(&path, Some(&admin)).await.assert_error(409, "event_has_paid_orders");
    app.delete(&format!("{path}?refund=maybe"), Some(&admin)).await.assert_error(400, "invalid_query");
    // No worker: only the api refunds, until it is killed.
    worker.kill();

    let deleting = {
        let request = app.client.delete(app.url(&format!("{path}?refund=true"))).bearer_auth(&admin);
        tokio::spawn(async move { request.send().await })
    };
    let pool = app.db.pool.clone();
    let count_refunded = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'REFUNDED'")
            .bind(event)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while count_refunded().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no refund started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    app.stop_api().await;
    let _ = deleting.await;
    let midway = count_refunded().await;
    assert!(midway > 0 && midway < 300, "killed midway: {midway} of 300 refunded");

    // Meanwhile the event is deleted and off sale; a worker finishes the refunds.
    let refunding: bool =
        sqlx::query_scalar("SELECT deleted_at IS NOT NULL AND refunding_since IS NOT NULL FROM events WHERE id = $1")
            .bind(event)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(refunding);
    let worker = app.worker_with(worker_settings).await;
    // The expiry loop's rounds finish deletions left unfinished, a batch at a time.
    assert!(worker.steps().expiry().await);
    let done: bool = sqlx::query_scalar("SELECT refunding_since IS NULL FROM events WHERE id = $1")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(done, "the deletion is finished");

    // Every paid order refunded exactly once: one REFUNDED change and one refund each.
    let (refunded, changes, refunds, live): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'REFUNDED'),
                (SELECT count(*) FROM order_history h JOIN orders o ON o.id = h.order_id
                 WHERE o.event_id = $1 AND h.status = 'REFUNDED'),
                (SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id
                 WHERE o.event_id = $1 AND r.source = 'EVENT_DELETED'),
                (SELECT count(*) FROM tickets WHERE event_id = $1 AND status = 'ACTIVE')",
    )
    .bind(event)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((refunded, changes, refunds, live), (300, 300, 300, 0));
    let (_, sold) = app.assert_consistent(event).await;
    assert_eq!(sold, 0);

    // Once finished, the event is gone for good.
    app.restart_api().await;
    app.delete(&format!("{path}?refund=true"), Some(&admin)).await.assert_error(404, "not_found");
    app.get(&path, None).await.assert_error(404, "not_found");
}
