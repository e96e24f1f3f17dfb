//! Payments and holds end to end: the signed payment webhook, every transition over HTTP,
//! hold expiry by the worker, late payments, and the races between them, checked over HTTP
//! and in SQL with exact counts.

use std::time::Duration;

use common::config::WorkerConfig;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::{Response, TestApp, WEBHOOK_SECRET, sign_webhook, worker_decides};
use uuid::Uuid;

/// Worker settings for tests about holds: three-second holds (long enough to act on a
/// loaded machine), expired within 50 ms.
fn short_holds(config: &mut WorkerConfig) {
    (config.hold_ttl_secs, config.expiry_interval_ms) = (3, 50);
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The three Standard Webhooks headers for `body`, signed with `key`.
fn signed(key: &[u8], id: &str, timestamp: i64, body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", sign_webhook(key, id, timestamp, body)),
    ]
}

async fn order_json(app: &TestApp, token: &str, id: Uuid) -> Value {
    let res = app.get(&format!("/api/v1/orders/{id}"), Some(token)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    res.json
}

async fn history(app: &TestApp, order: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT status FROM order_status_changes WHERE order_id = $1 ORDER BY id")
        .bind(order)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

async fn late_payments(app: &TestApp, order: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM late_payments WHERE order_id = $1")
        .bind(order)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// Waits (long-polling) until the order has `status`.
async fn wait_for_status(app: &TestApp, token: &str, id: Uuid, status: &str) -> Value {
    let mut seen = app.get(&format!("/api/v1/orders/{id}"), Some(token)).await.json;
    for _ in 0..10 {
        if seen["status"] == status {
            return seen;
        }
        let path = format!("/api/v1/orders/{id}?wait=5&status={}", seen["status"].as_str().unwrap());
        seen = app.get(&path, Some(token)).await.json;
    }
    panic!("order {id} never became {status}");
}

fn assert_transition_refused(res: &Response, current: &str) {
    res.assert_error(409, "invalid_transition");
    assert_eq!(res.json["error"]["current_status"], current, "{}", res.body);
}

#[tokio::test]
async fn payment_webhooks_must_be_signed() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(3).await;
    let order = app.pending_order(&buyers[0].1, event, 1).await;
    let key = WEBHOOK_SECRET.as_bytes();
    let body = json!({"status": "PAID", "order_id": order}).to_string();

    // Refused, and nothing changes: wrong key, tampered body, stale or future timestamp,
    // each header missing, and signatures that are empty, truncated or of another version.
    let refused = [
        signed(b"another-secret-another-secret-another", "msg_1", now(), &body),
        signed(key, "msg_2", now(), &json!({"status": "REJECTED", "order_id": order}).to_string()),
        signed(key, "msg_3", now() - 301, &body),
        signed(key, "msg_4", now() + 301, &body),
    ];
    for headers in &refused {
        app.raw_payment(order, &body, headers).await.assert_error(401, "unauthorized");
    }
    let valid = signed(key, "msg_5", now(), &body);
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let headers: Vec<_> = valid.iter().filter(|(name, _)| *name != missing).cloned().collect();
        let res = app.raw_payment(order, &body, &headers).await;
        res.assert_error(401, "unauthorized");
        assert!(res.json["error"]["message"].as_str().unwrap().contains(missing), "{}", res.body);
    }
    let signature = &valid[2].1;
    for bad in ["v1,".to_owned(), signature[..10].to_owned(), signature.replace("v1,", "v2,")] {
        let headers = [valid[0].clone(), valid[1].clone(), ("webhook-signature", bad)];
        app.raw_payment(order, &body, &headers).await.assert_error(401, "unauthorized");
    }
    // The id is signed too: the same signature under another id is refused.
    let headers = [("webhook-id", "msg_6".to_owned()), valid[1].clone(), valid[2].clone()];
    app.raw_payment(order, &body, &headers).await.assert_error(401, "unauthorized");
    assert_eq!(order_json(&app, &buyers[0].1, order).await["status"], "PENDING");

    // Valid: applied once. Replaying the same webhook-id gets the same answer and no effect.
    let res = app.raw_payment(order, &body, &valid).await;
    assert_eq!(res.status, 204, "{}", res.body);
    assert_eq!(order_json(&app, &buyers[0].1, order).await["status"], "PAID");
    let res = app.raw_payment(order, &body, &valid).await;
    assert_eq!(res.status, 204, "{}", res.body);
    assert_eq!(history(&app, order).await, ["QUEUED", "PENDING", "PAID"]);
    // The same id for another order is a provider bug, not a replay.
    let other = app.pending_order(&buyers[1].1, event, 1).await;
    let other_body = json!({"status": "PAID"}).to_string();
    let headers = signed(key, "msg_5", now(), &other_body);
    app.raw_payment(other, &other_body, &headers).await.assert_error(422, "webhook_id_reused");

    // Key rotation: several signatures in one header, one of them by the current key.
    let id = "msg_rotated";
    let ts = now();
    let old = sign_webhook(b"the-previous-secret-the-previous-secret", id, ts, &other_body);
    let current = sign_webhook(key, id, ts, &other_body);
    let headers = [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", format!("{old} {current}")),
    ];
    let res = app.raw_payment(other, &other_body, &headers).await;
    assert_eq!(res.status, 204, "{}", res.body);
    assert_eq!(order_json(&app, &buyers[1].1, other).await["status"], "PAID");
    app.assert_consistent(event).await;
}

#[tokio::test]
async fn payment_webhook_bodies_are_validated() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let order = app.pending_order(&buyers[0].1, event, 1).await;
    let key = WEBHOOK_SECRET.as_bytes();
    let send = |path_id: String, body: &'static str| {
        let headers = signed(key, &format!("msg_{}", Uuid::new_v4().simple()), now(), body);
        let app = &app;
        async move { app.raw_payment(path_id, body, &headers).await }
    };

    send(order.to_string(), "{not json").await.assert_error(400, "malformed_json");
    send(order.to_string(), r#"{"status": "SHIPPED"}"#).await.assert_error(422, "invalid_body");
    // REFUNDED is a status the provider may report, for a paid order only.
    let unpaid = send(order.to_string(), r#"{"status": "REFUNDED"}"#).await;
    unpaid.assert_error(409, "invalid_transition");
    assert_eq!(unpaid.json["error"]["current_status"], "PENDING");
    send(order.to_string(), r#"{"reason": "no status"}"#).await.assert_error(422, "invalid_body");
    send(order.to_string(), r#"{"status": "REJECTED", "reason": ""}"#).await.assert_error(422, "invalid_body");
    let mismatch = app.payment(order, &json!({"status": "PAID", "order_id": Uuid::now_v7()})).await;
    mismatch.assert_error(422, "order_mismatch");
    app.payment(Uuid::now_v7(), &json!({"status": "PAID"})).await.assert_error(404, "not_found");
    send("not-a-uuid".to_owned(), r#"{"status": "PAID"}"#).await.assert_error(404, "not_found");
    assert_eq!(order_json(&app, &buyers[0].1, order).await["status"], "PENDING", "nothing was applied");
}

#[tokio::test]
async fn every_transition_over_http() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 6, 4).await;
    let buyers = app.buyers(5).await;
    let token = |i: usize| buyers[i].1.as_str();

    // QUEUED (no worker yet): neither payment nor cancel applies.
    let res = app.order(token(0), event, 2, None).await;
    let queued: Uuid = res.json["id"].as_str().unwrap().parse().unwrap();
    assert_transition_refused(&app.payment(queued, &json!({"status": "PAID"})).await, "QUEUED");
    assert_transition_refused(
        &app.post(&format!("/api/v1/orders/{queued}/cancel"), &json!({}), Some(token(0))).await,
        "QUEUED",
    );
    let _worker = app.worker().await;
    wait_for_status(&app, token(0), queued, "PENDING").await;

    // PENDING → PAID; PAID again is a no-op 204; REJECTED or cancel after PAID are refused.
    let paid = queued;
    assert_eq!(app.payment(paid, &json!({"status": "PAID"})).await.status, 204);
    assert_eq!(app.payment(paid, &json!({"status": "PAID"})).await.status, 204);
    assert_transition_refused(&app.payment(paid, &json!({"status": "REJECTED"})).await, "PAID");
    assert_transition_refused(
        &app.post(&format!("/api/v1/orders/{paid}/cancel"), &json!({}), Some(token(0))).await,
        "PAID",
    );
    let detail = order_json(&app, token(0), paid).await;
    assert_eq!(detail["status"], "PAID");
    assert!(detail["tickets"].as_array().unwrap().iter().all(|t| t["status"] == "ACTIVE"), "{detail}");
    let statuses: Vec<&str> =
        detail["history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["QUEUED", "PENDING", "PAID"]);
    assert!(detail["history"].as_array().unwrap().iter().all(|h| h["at"].is_string()), "{detail}");

    // PENDING → REJECTED (payment declined): tickets released, reason kept; PAID afterwards
    // is a late payment.
    let declined = app.pending_order(token(1), event, 2).await;
    assert_eq!(app.payment(declined, &json!({"status": "REJECTED", "reason": "card declined"})).await.status, 204);
    let detail = order_json(&app, token(1), declined).await;
    assert_eq!((&detail["status"], &detail["reason"]), (&json!("REJECTED"), &json!("card declined")));
    assert!(detail["tickets"].as_array().unwrap().iter().all(|t| t["status"] == "CANCELLED"), "{detail}");
    assert_eq!(app.payment(declined, &json!({"status": "REJECTED"})).await.status, 204, "same transition again");
    assert_transition_refused(&app.payment(declined, &json!({"status": "PAID"})).await, "REJECTED");
    assert_eq!(late_payments(&app, declined).await, 1);
    let without_reason = app.pending_order(token(1), event, 1).await;
    assert_eq!(app.payment(without_reason, &json!({"status": "REJECTED"})).await.status, 204);
    assert_eq!(order_json(&app, token(1), without_reason).await["reason"], "PAYMENT_DECLINED");

    // PENDING → CANCELLED by its owner (only): tickets released; cancelling again is 200.
    let cancelled = app.pending_order(token(2), event, 2).await;
    let path = format!("/api/v1/orders/{cancelled}/cancel");
    app.post(&path, &json!({}), Some(token(3))).await.assert_error(404, "not_found");
    app.post(&path, &json!({}), None).await.assert_error(401, "unauthorized");
    let res = app.post(&path, &json!({}), Some(token(2))).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json["status"], "CANCELLED");
    assert!(res.json["tickets"].as_array().unwrap().iter().all(|t| t["status"] == "CANCELLED"), "{}", res.body);
    assert_eq!(app.post(&path, &json!({}), Some(token(2))).await.status, 200);
    assert_transition_refused(&app.payment(cancelled, &json!({"status": "REJECTED"})).await, "CANCELLED");
    app.post("/api/v1/orders/not-a-uuid/cancel", &json!({}), Some(token(2))).await.assert_error(404, "not_found");

    // Capacity 6: 2 paid; the declined and cancelled holds came back, so 4 are for sale.
    assert_eq!(app.assert_consistent(event).await, (6, 2));
    let again = app.pending_order(token(4), event, 4).await;
    assert_eq!(order_json(&app, token(4), again).await["tickets"].as_array().unwrap().len(), 4);
    assert_eq!(app.assert_consistent(event).await, (6, 6));
}

#[tokio::test]
async fn expired_holds_are_sold_again_and_late_payments_recorded() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(short_holds).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 3, 4).await;
    let buyers = app.buyers(2).await;
    let (first, second) = (buyers[0].1.as_str(), buyers[1].1.as_str());

    let held = app.pending_order(first, event, 3).await;
    let res = app.order(second, event, 3, None).await;
    let turned_down: Uuid = res.json["id"].as_str().unwrap().parse().unwrap();
    let detail = wait_for_status(&app, second, turned_down, "REJECTED").await;
    assert_eq!(detail["reason"], "SOLD_OUT");

    // The hold runs out: the worker expires it and the tickets go back.
    let detail = wait_for_status(&app, first, held, "EXPIRED").await;
    assert!(detail["tickets"].as_array().unwrap().iter().all(|t| t["status"] == "CANCELLED"), "{detail}");
    let statuses: Vec<&str> =
        detail["history"].as_array().unwrap().iter().map(|h| h["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["QUEUED", "PENDING", "EXPIRED"]);
    assert_eq!(app.assert_consistent(event).await, (3, 0));

    // The payment arrives too late: 409, the order stays EXPIRED, the payment is recorded.
    let late = app.payment(held, &json!({"status": "PAID"})).await;
    assert_transition_refused(&late, "EXPIRED");
    assert_eq!(order_json(&app, first, held).await["status"], "EXPIRED");
    assert_eq!(late_payments(&app, held).await, 1);

    // The buyer turned away before now gets the tickets, and pays in time.
    let bought = app.pending_order(second, event, 3).await;
    assert_eq!(app.payment(bought, &json!({"status": "PAID"})).await.status, 204);
    assert_eq!(app.assert_consistent(event).await, (3, 3));

    // Operators see the late payment and mark it refunded.
    let buyer = app.get("/api/v1/late-payments", Some(first)).await;
    buyer.assert_error(403, "forbidden");
    let list = app.get("/api/v1/late-payments", Some(&admin)).await;
    assert_eq!(list.status, 200, "{}", list.body);
    let entries = list.json.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{}", list.body);
    assert_eq!(entries[0]["order_id"], held.to_string());
    assert_eq!((&entries[0]["order_status"], &entries[0]["amount"]), (&json!("EXPIRED"), &json!("149.70")));
    assert!(entries[0]["refunded_at"].is_null());
    let id = entries[0]["id"].as_str().unwrap();
    let refunded = app.post(&format!("/api/v1/late-payments/{id}/refund"), &json!({}), Some(&admin)).await;
    assert_eq!(refunded.status, 200, "{}", refunded.body);
    assert!(refunded.json["refunded_at"].is_string());
    let again = app.post(&format!("/api/v1/late-payments/{id}/refund"), &json!({}), Some(&admin)).await;
    assert_eq!(again.json["refunded_at"], refunded.json["refunded_at"], "the first refund time is kept");
    let unknown = app.post(&format!("/api/v1/late-payments/{}/refund", Uuid::now_v7()), &json!({}), Some(&admin)).await;
    unknown.assert_error(404, "not_found");
}

/// The clock decides, not which process gets there first: past `expires_at` a hold is
/// over even when no expiry loop has run yet.
#[tokio::test]
async fn a_hold_past_its_time_is_over_before_the_expiry_loop_runs() {
    let app = TestApp::spawn().await;
    let _worker = app.worker_with(|c| (c.hold_ttl_secs, c.expiry_interval_ms) = (1, 3_600_000)).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let paid_late = app.pending_order(&buyers[0].1, event, 2).await;
    let cancelled_late = app.pending_order(&buyers[1].1, event, 3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The loop's first tick came at start-up; the next is an hour away.
    assert_eq!(order_json(&app, &buyers[0].1, paid_late).await["status"], "PENDING");

    assert_transition_refused(&app.payment(paid_late, &json!({"status": "PAID"})).await, "EXPIRED");
    assert_eq!(late_payments(&app, paid_late).await, 1);
    let res = app.post(&format!("/api/v1/orders/{cancelled_late}/cancel"), &json!({}), Some(&buyers[1].1)).await;
    assert_transition_refused(&res, "EXPIRED");
    assert_eq!(history(&app, cancelled_late).await, ["QUEUED", "PENDING", "EXPIRED"]);
    assert_eq!(app.assert_consistent(event).await, (10, 0));
}

/// PAID webhooks sent around the moment each hold expires, against two workers expiring
/// holds every 10 ms: for every order exactly one side wins, the answer matches the final
/// state, and capacity adds up.
#[tokio::test]
async fn paid_webhook_races_hold_expiry() {
    const ORDERS: usize = 80;
    let app = TestApp::spawn_with(&worker_decides()).await;
    let holds = |c: &mut WorkerConfig| (c.hold_ttl_secs, c.expiry_interval_ms) = (3, 10);
    let first = app.worker_with(holds).await;
    let second = app.worker_with(holds).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, ORDERS as i64, 1).await;
    let buyers = app.buyers(ORDERS).await;

    let accepted = join_all(buyers.iter().map(|(_, token)| app.order(token, event, 1, None))).await;
    let ids: Vec<Uuid> = accepted.iter().map(|r| r.json["id"].as_str().unwrap().parse().unwrap()).collect();
    app.wait_until_final(Duration::from_secs(30)).await;
    let expiries: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT id, expires_at FROM orders WHERE id = ANY($1) AND status = 'PENDING'")
            .bind(&ids)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(expiries.len(), ORDERS, "every order got a hold");

    // Order i pays at its expiry + an offset spread over -400..+400 ms.
    let answers = join_all(expiries.iter().enumerate().map(|(i, (id, expires_at))| {
        let offset = chrono::Duration::milliseconds((i as i64 * 800 / ORDERS as i64) - 400);
        let at = *expires_at + offset;
        let app = &app;
        async move {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            (*id, app.payment(*id, &json!({"status": "PAID"})).await)
        }
    }))
    .await;

    // Both expiry loops finish whatever they were doing (a round begun after the last
    // answer, done), then every order is checked.
    assert!(first.steps().expiry().await && second.steps().expiry().await);
    let (mut paid, mut expired) = (0, 0);
    for (id, answer) in &answers {
        let (status,): (String,) =
            sqlx::query_as("SELECT status FROM orders WHERE id = $1").bind(id).fetch_one(&app.db.pool).await.unwrap();
        let late = late_payments(&app, *id).await;
        match answer.status {
            204 => {
                assert_eq!((status.as_str(), late), ("PAID", 0), "204 but the order is {status}");
                paid += 1;
            }
            409 => {
                assert_transition_refused(answer, "EXPIRED");
                assert_eq!((status.as_str(), late), ("EXPIRED", 1), "409 but the order is {status}");
                expired += 1;
            }
            other => panic!("unexpected answer {other}: {}", answer.body),
        }
        let transitions = history(&app, *id).await;
        assert_eq!(transitions.len(), 3, "exactly one of PAID and EXPIRED: {transitions:?}");
    }
    assert_eq!(paid + expired, ORDERS);
    assert!(paid > 0 && expired > 0, "both sides should win some races: paid {paid}, expired {expired}");
    assert_eq!(app.assert_consistent(event).await, (ORDERS as i64, paid as i64));
}

/// The provider retries, and sometimes sends the same thing twice at once: one effect only.
#[tokio::test]
async fn concurrent_duplicate_webhooks_have_one_effect() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(short_holds).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(3).await;
    let key = WEBHOOK_SECRET.as_bytes();

    // One webhook-id delivered 20 times at once: all get 204, one PAID in the history.
    let order = app.pending_order(&buyers[0].1, event, 2).await;
    let body = json!({"status": "PAID"}).to_string();
    let headers = signed(key, "msg_same", now(), &body);
    let answers = join_all((0..20).map(|_| app.raw_payment(order, &body, &headers))).await;
    assert!(answers.iter().all(|r| r.status == 204), "{:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(history(&app, order).await, ["QUEUED", "PENDING", "PAID"]);

    // Twenty different ids declining one order at once: one release of its tickets.
    let declined = app.pending_order(&buyers[1].1, event, 4).await;
    let rejected = json!({"status": "REJECTED"});
    let answers = join_all((0..20).map(|_| app.payment(declined, &rejected))).await;
    assert!(answers.iter().all(|r| r.status == 204), "{:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(history(&app, declined).await, ["QUEUED", "PENDING", "REJECTED"]);

    // A late payment delivered 10 times at once under one id is recorded once.
    let expired = app.pending_order(&buyers[2].1, event, 1).await;
    wait_for_status(&app, &buyers[2].1, expired, "EXPIRED").await;
    let headers = signed(key, "msg_late", now(), &body);
    let answers = join_all((0..10).map(|_| app.raw_payment(expired, &body, &headers))).await;
    for answer in &answers {
        assert_transition_refused(answer, "EXPIRED");
    }
    assert_eq!(late_payments(&app, expired).await, 1);
    assert_eq!(app.assert_consistent(event).await, (10, 2));
}

#[tokio::test]
async fn sign_webhook_prints_headers_the_api_accepts() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let order = app.pending_order(&buyers[0].1, event, 1).await;
    let body = json!({"status": "PAID", "order_id": order}).to_string();

    let (ok, stdout, stderr) =
        tests::run("api", &["sign-webhook", "--body", &body], &[("WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned())], None);
    assert!(ok, "sign-webhook failed: {stderr}");
    let headers: Vec<(&str, String)> = stdout
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| match name {
            "webhook-id" => ("webhook-id", value.to_owned()),
            "webhook-timestamp" => ("webhook-timestamp", value.to_owned()),
            _ => ("webhook-signature", value.to_owned()),
        })
        .collect();
    assert_eq!(headers.len(), 3, "{stdout}");
    let res = app.raw_payment(order, &body, &headers).await;
    assert_eq!(res.status, 204, "{}", res.body);
    assert_eq!(order_json(&app, &buyers[0].1, order).await["status"], "PAID");
}

/// A large status update on a connection whose first one it is writes its history rows in
/// linear time. The history trigger's statement is planned for its first run's size: in the
/// form before migration 0024, 50,000 orders too many to hash in `work_mem` were compared each
/// with each (minutes); joined by hashing, it takes about a second.
#[tokio::test]
async fn a_large_first_status_update_writes_its_history_in_linear_time() {
    use sqlx::Connection as _;
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (buyer, _) = app.user("Buyer").await;
    let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("SET work_mem = '64kB'").execute(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, user_id, event_id, quantity, total, lines)
         SELECT gen_random_uuid(), $1, $2, 1, 0, '[]' FROM generate_series(1, 50000)",
    )
    .bind(buyer)
    .bind(event)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("SET statement_timeout = '60s'").execute(&mut conn).await.unwrap();
    let cancelled = sqlx::query("UPDATE orders SET status = 'CANCELLED' WHERE event_id = $1 AND status = 'QUEUED'")
        .bind(event)
        .execute(&mut conn)
        .await
        .expect("the update and its history within the statement timeout");
    assert_eq!(cancelled.rows_affected(), 50_000);
    let changes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_history h JOIN orders o ON o.id = h.order_id
         WHERE o.event_id = $1 AND h.status = 'CANCELLED'",
    )
    .bind(event)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(changes, 50_000);
}
