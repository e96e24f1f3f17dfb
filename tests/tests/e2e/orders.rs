//! The purchase pipeline end to end: api → RabbitMQ partition queues → worker → PostgreSQL,
//! observed over HTTP and checked in SQL with exact counts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tests::{Exposition, Response, TestApp, mint_token, worker_decides};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

/// Fires one purchase per buyer, all at once, and returns the responses in buyer order.
async fn stampede(
    app: &TestApp,
    buyers: &[(Uuid, String)],
    event: Uuid,
    quantity: impl Fn(usize) -> i64,
) -> Vec<Response> {
    join_all(buyers.iter().enumerate().map(|(i, (_, token))| app.order(token, event, quantity(i), None))).await
}

/// Per status: (orders, tickets wanted).
async fn status_counts(app: &TestApp, event: Uuid) -> HashMap<(String, Option<String>), (i64, i64)> {
    let rows: Vec<(String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT status, reason, count(*), sum(quantity)::bigint FROM orders WHERE event_id = $1 GROUP BY status, reason",
    )
    .bind(event)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(status, reason, n, q)| ((status, reason), (n, q))).collect()
}

fn key(status: &str, reason: Option<&str>) -> (String, Option<String>) {
    (status.to_owned(), reason.map(str::to_owned))
}

#[tokio::test]
async fn two_hundred_buyers_race_for_a_hundred_tickets() {
    // The fast path is off so that every buyer gets an order and the counts are exact.
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(200).await;

    let responses = stampede(&app, &buyers, event, |_| 1).await;
    for res in &responses {
        assert_eq!(res.status, 202, "{}", res.body);
        assert_eq!(res.json["status"], "QUEUED");
        assert_eq!(
            res.header("location"),
            Some(format!("/api/v1/orders/{}", res.json["id"].as_str().unwrap()).as_str())
        );
    }
    app.wait_until_final(SETTLE).await;

    let counts = status_counts(&app, event).await;
    assert_eq!(counts.get(&key("PENDING", None)), Some(&(100, 100)), "{counts:?}");
    assert_eq!(counts.get(&key("REJECTED", Some("SOLD_OUT"))), Some(&(100, 100)), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(app.assert_consistent(event).await, (100, 100));
    let event_json = app.get(&format!("/api/v1/events/{event}"), None).await;
    assert_eq!(event_json.json["tickets_available"], 0);
}

/// A backlog spread over many events: the worker allocates each batch, whatever the number
/// of events in it, in one transaction, and every event must still sell out exactly.
#[tokio::test]
async fn batches_spanning_many_events_sell_each_out_exactly() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let admin = app.admin().await;
    let mut events = Vec::new();
    for i in 0..12 {
        events.push(app.event_with(&admin, 5 + i, 4).await);
    }
    let buyers = app.buyers(300).await;
    // Accepted while no worker runs, so that each batch holds orders of several events.
    let responses =
        join_all(buyers.iter().enumerate().map(|(i, (_, token))| app.order(token, events[i % events.len()], 1, None)))
            .await;
    assert!(responses.iter().all(|r| r.status == 202), "{responses:?}");
    let _worker = app.worker_with(|c| c.batch_size = 200).await;
    app.wait_until_final(SETTLE).await;
    // Capacities differ, so a batch that mixed up its events' rows would show.
    for (capacity, event) in (5..).zip(&events) {
        let counts = status_counts(&app, *event).await;
        assert_eq!(counts.get(&key("PENDING", None)), Some(&(capacity, capacity)), "{counts:?}");
        let rejected = 25 - capacity;
        assert_eq!(counts.get(&key("REJECTED", Some("SOLD_OUT"))), Some(&(rejected, rejected)), "{counts:?}");
        assert_eq!(app.assert_consistent(*event).await, (capacity, capacity));
    }
}

#[tokio::test]
async fn random_quantities_sell_out_exactly() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(|c| c.batch_size = 16).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 150, 4).await;
    let buyers = app.buyers(150).await;
    // A fixed, varied sequence of 1..=4 (no RNG needed to vary the sizes).
    let quantity = |i: usize| ((i * 7 + i / 3) % 4 + 1) as i64;

    let responses = stampede(&app, &buyers, event, quantity).await;
    assert!(responses.iter().all(|r| r.status == 202), "not all accepted");
    app.wait_until_final(SETTLE).await;

    let (capacity, sold) = app.assert_consistent(event).await;
    let left = capacity - sold;
    let rejected: Vec<i32> =
        sqlx::query_scalar("SELECT quantity FROM orders WHERE event_id = $1 AND status = 'REJECTED'")
            .bind(event)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert!(!rejected.is_empty(), "demand exceeded capacity, someone must be turned down");
    assert!(
        sold == capacity || rejected.iter().all(|q| i64::from(*q) > left),
        "{left} tickets left although an order for fewer was rejected: {rejected:?}"
    );
    let counts = status_counts(&app, event).await;
    assert_eq!(counts.get(&key("PENDING", None)).map(|c| c.1), Some(sold), "{counts:?}");
}

/// Orders of one event are decided in the order they were accepted: the first ones get the
/// tickets, whatever the batches.
#[tokio::test]
async fn one_events_orders_are_decided_in_arrival_order() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let accepted = twenty_orders_for_eight_tickets(&app).await;
    let _worker = app.worker_with(|c| c.batch_size = 3).await;
    app.wait_until_final(SETTLE).await;
    assert_first_eight_hold_tickets(&app, &accepted).await;
}

/// Twenty orders of one ticket each, one per buyer, accepted in turn for an event of eight
/// tickets (with no worker running, so they queue); their ids in arrival order.
async fn twenty_orders_for_eight_tickets(app: &TestApp) -> Vec<Uuid> {
    let admin = app.admin().await;
    let event = app.event_with(&admin, 8, 1).await;
    let mut accepted = Vec::new();
    for (_, token) in &app.buyers(20).await {
        let res = app.order(token, event, 1, None).await;
        assert_eq!(res.status, 202, "{}", res.body);
        accepted.push(res.json["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    accepted
}

/// The first eight orders to arrive hold the tickets; the other twelve were rejected.
async fn assert_first_eight_hold_tickets(app: &TestApp, accepted: &[Uuid]) {
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM orders JOIN UNNEST($1::uuid[]) WITH ORDINALITY AS a(id, n) USING (id) ORDER BY a.n",
    )
    .bind(accepted)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let expected: Vec<&str> = (0..20).map(|i| if i < 8 { "PENDING" } else { "REJECTED" }).collect();
    assert_eq!(statuses, expected);
}

/// A batch whose transaction fails is retried before the next batch of its partition is
/// decided, although the next one is gathered (and would be ready) meanwhile: the first order's
/// decision fails twice, and the tickets still go to the first orders to arrive.
#[tokio::test]
async fn a_failed_batch_is_decided_again_before_the_next() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let accepted = twenty_orders_for_eight_tickets(&app).await;
    // A sequence is not rolled back with the transaction that draws from it.
    for statement in [
        "CREATE SEQUENCE failed_decisions".to_owned(),
        format!(
            "CREATE FUNCTION fail_first_decision() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF OLD.id = '{}' AND NEW.status <> 'QUEUED' AND nextval('failed_decisions') <= 2 THEN
                     RAISE EXCEPTION 'injected failure';
                 END IF;
                 RETURN NEW;
             END $$",
            accepted[0]
        ),
        "CREATE TRIGGER fail_first_decision BEFORE UPDATE ON orders FOR EACH ROW
         EXECUTE FUNCTION fail_first_decision()"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&app.db.pool).await.unwrap();
    }
    let _worker = app.worker_with(|c| c.batch_size = 3).await;
    app.wait_until_final(SETTLE).await;
    let attempts: i64 =
        sqlx::query_scalar("SELECT last_value FROM failed_decisions").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(attempts, 3, "two failed transactions, then the one that committed");
    assert_first_eight_hold_tickets(&app, &accepted).await;
}

/// The ids of a transaction's changed orders are announced on commit, however many: more
/// than one notification's worth (200 ids each), all sent by one statement.
#[tokio::test]
async fn every_changed_order_is_announced_on_commit() {
    let app = TestApp::spawn().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db.pool).await.unwrap();
    listener.listen(common::db::ORDER_CHANGES_CHANNEL).await.unwrap();
    let ids: Vec<Uuid> = (0..450).map(|_| Uuid::now_v7()).collect();
    let mut tx = app.db.pool.begin().await.unwrap();
    common::db::notify_order_changes(&mut tx, &ids).await.unwrap();
    common::db::notify_order_changes(&mut tx, &[]).await.unwrap();
    tx.commit().await.unwrap();
    let mut announced = Vec::new();
    let mut notifications = 0;
    while announced.len() < ids.len() {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
        notifications += 1;
        announced.extend(notification.payload().split(',').map(|id| id.parse::<Uuid>().unwrap()));
    }
    assert_eq!(announced, ids, "each id once, in order");
    assert_eq!(notifications, 3, "200 ids a notification");
}

#[tokio::test]
async fn an_accepted_order_can_be_followed_to_its_outcome() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let (_, stranger) = app.user("Stranger").await;

    let res = app.order(&buyer, event, 3, None).await;
    assert_eq!(res.status, 202, "{}", res.body);
    assert_eq!(res.json["total"], "149.70", "3 × 49.90");
    assert_eq!(res.json["total_amount"], "149.70", "the Go API's name for the total");
    assert_eq!(res.json["unit_price"], "49.90");
    assert_eq!(res.json["event_name"], "Turnstile Live");
    let id = res.json["id"].as_str().unwrap().to_owned();

    let polled = app.get(&format!("/api/v1/orders/{id}?wait=20"), Some(&buyer)).await;
    assert_eq!(polled.status, 200, "{}", polled.body);
    assert_eq!(polled.json["status"], "PENDING", "{}", polled.body);
    assert_eq!(polled.json["total_amount"], "149.70");
    assert!(polled.json["expires_at"].is_string(), "a held order says until when: {}", polled.body);
    let tickets = polled.json["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 3);
    assert!(tickets.iter().all(|t| t["status"] == "ACTIVE"));

    // Only the owner (and admins) see an order; for anyone else it does not exist.
    app.get(&format!("/api/v1/orders/{id}"), Some(&stranger)).await.assert_error(404, "not_found");
    assert_eq!(app.get(&format!("/api/v1/orders/{id}"), Some(&admin)).await.status, 200);
    app.get(&format!("/api/v1/orders/{id}"), None).await.assert_error(401, "unauthorized");
    app.get("/api/v1/orders/not-a-uuid", Some(&buyer)).await.assert_error(404, "not_found");
    app.get(&format!("/api/v1/orders/{id}?wait=31"), Some(&buyer)).await.assert_error(400, "invalid_query");

    // The caller's list, newest first.
    let second = app.order(&buyer, event, 1, None).await;
    let list = app.get("/api/v1/orders", Some(&buyer)).await;
    let ids: Vec<&str> = list.json.as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.json["id"].as_str().unwrap(), id.as_str()]);
    assert_eq!(list.json[1]["event_name"], "Turnstile Live");
    assert!(list.json[1]["event_date"].is_string());
    assert_eq!(app.get("/api/v1/orders", Some(&stranger)).await.json, json!([]));
    let page = app.get("/api/v1/orders?limit=1", Some(&buyer)).await;
    assert_eq!(page.json.as_array().unwrap().len(), 1);
    assert!(page.header("link").is_some_and(|l| l.contains("rel=\"next\"")));
}

#[tokio::test]
async fn long_poll_returns_when_the_worker_decides() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let id = app.order(&buyer, event, 1, None).await.json["id"].as_str().unwrap().to_owned();

    // No worker yet: the wait runs out and the order is still QUEUED.
    let started = std::time::Instant::now();
    let res = app.get(&format!("/api/v1/orders/{id}?wait=1"), Some(&buyer)).await;
    assert_eq!(res.json["status"], "QUEUED");
    assert!(started.elapsed() >= Duration::from_millis(900), "returned before the wait ran out");

    // A worker starts while the client waits; the answer comes as soon as it decided.
    let path = format!("/api/v1/orders/{id}?wait=30");
    let poll = app.get(&path, Some(&buyer));
    let worker = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.worker().await
    };
    let started = std::time::Instant::now();
    let (res, _worker) = tokio::join!(poll, worker);
    assert_eq!(res.json["status"], "PENDING", "{}", res.body);
    assert!(started.elapsed() < Duration::from_secs(25), "long poll was not woken: {:?}", started.elapsed());
}

#[tokio::test]
async fn purchase_input_is_validated() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;

    app.order(&buyer, Uuid::now_v7(), 1, None).await.assert_error(404, "not_found");
    app.order(&buyer, event, 0, None).await.assert_error(422, "invalid_quantity");
    app.order(&buyer, event, -1, None).await.assert_error(422, "invalid_quantity");
    app.order(&buyer, event, 5, None).await.assert_error(422, "invalid_quantity");
    app.post("/api/v1/orders", &json!({"event_id": "nope", "quantity": 1}), Some(&buyer))
        .await
        .assert_error(422, "invalid_body");
    app.post("/api/v1/orders", &json!({"event_id": event}), Some(&buyer)).await.assert_error(422, "invalid_body");
    app.post("/api/v1/orders", &json!({"event_id": event, "quantity": 1}), None)
        .await
        .assert_error(401, "unauthorized");
    let bad_key = app
        .client
        .post(app.url("/api/v1/orders"))
        .bearer_auth(&buyer)
        .header("idempotency-key", "has spaces")
        .json(&json!({"event_id": event, "quantity": 1}))
        .send()
        .await
        .unwrap();
    tests::Response::from(bad_key).await.assert_error(400, "invalid_idempotency_key");

    let started = app.event_with(&admin, 10, 4).await;
    sqlx::query("UPDATE events SET starts_at = now() - interval '1 minute' WHERE id = $1")
        .bind(started)
        .execute(&app.db.pool)
        .await
        .unwrap();
    app.order(&buyer, started, 1, None).await.assert_error(422, "event_unavailable");
    let deleted = app.event_with(&admin, 10, 4).await;
    sqlx::query("UPDATE events SET deleted_at = now() WHERE id = $1")
        .bind(deleted)
        .execute(&app.db.pool)
        .await
        .unwrap();
    app.order(&buyer, deleted, 1, None).await.assert_error(404, "not_found");

    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(orders, 0, "refused requests must not leave orders behind");
}

/// Every buyer asks at once for an event the api has not read (here an api started after the
/// event was announced: one restarted during an on-sale). They wait for one read of it (held
/// here behind a lock on `ticket_types`), instead of each taking a pooled connection (opened
/// then and there) to read it again.
#[tokio::test]
async fn concurrent_purchases_of_an_unread_event_read_it_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let (_fresh, fresh) = app.spawn_another_api();
    let buyers = app.buyers(30).await;
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ticket_types IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();

    let waiting_reads = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'SELECT e.id, e.name, e.starts_at%'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    let watch = async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while waiting_reads().await == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the event's read waits for the lock");
        // Every request has had time to reach the catalog (where each request read for
        // itself, all the pool's connections were waiting by now).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waiting = waiting_reads().await;
        blocker.rollback().await.unwrap();
        waiting
    };
    let stampede = join_all(buyers.iter().map(|(_, token)| app.order_at(&fresh, token, event, 1, None)));
    let (responses, waiting) = tokio::join!(stampede, watch);
    assert_eq!(waiting, 1, "one read for all the buyers");
    assert!(responses.iter().all(|res| res.status == 202), "every buyer's order is accepted");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE event_id = $1")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 30);
}

/// An event is read into every api's memory when it is created or changed, before anyone
/// asks for it: while its reads would wait behind a lock, another api quotes it from memory,
/// at its new price after a change, and no request of it ever read it.
#[tokio::test]
async fn announced_events_are_read_before_their_first_buyer() {
    let app = TestApp::spawn().await;
    let (other, other_base) = app.spawn_another_api();
    let metrics = other.metrics_base();
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let reads = |by: &'static str| {
        move |exposition: &Exposition| exposition.value("turnstile_catalog_reads_total", &[("by", by)])
    };
    let quote_behind_a_lock = |event: Uuid| {
        let (app, buyer, base) = (&app, buyer.clone(), other_base.clone());
        async move {
            let mut blocker = app.db.pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE ticket_types IN ACCESS EXCLUSIVE MODE").execute(&mut *blocker).await.unwrap();
            let res = tokio::time::timeout(Duration::from_secs(5), app.quote_at(&base, &buyer, event, 1))
                .await
                .expect("answered from memory, without a read waiting for the lock");
            blocker.rollback().await.unwrap();
            res
        }
    };

    let event = app.event_with(&admin, 10, 4).await;
    Exposition::scrape_until(&metrics, "the new event read", |e| reads("announcement")(e) == 1.0).await;
    let res = quote_behind_a_lock(event).await;
    assert_eq!((res.status, res.json["unit_price"].as_str()), (200, Some("49.90")), "{}", res.body);

    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"price": "10"}), Some(&admin)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    Exposition::scrape_until(&metrics, "the changed event read", |e| reads("announcement")(e) == 2.0).await;
    let res = quote_behind_a_lock(event).await;
    assert_eq!((res.status, res.json["unit_price"].as_str()), (200, Some("10.00")), "{}", res.body);

    let after = Exposition::scrape(&metrics).await;
    assert_eq!(reads("lookup")(&after), 0.0, "no request had to read the event");
    assert_eq!(after.value("turnstile_catalog_events", &[]), 1.0);
}

/// `POST /orders/quote`: the purchase's checks and price, nothing stored. Its answers come
/// from the api's memory of the event, which follows every change: at once in the process
/// that made it, through PostgreSQL's NOTIFY in any other (and for an operator's SQL).
#[tokio::test]
async fn quotes_price_a_purchase_and_follow_event_changes() {
    let app = TestApp::spawn().await;
    let (_other, other_base) = app.spawn_another_api();
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let quote = |base: String, quantity: i64| {
        let (app, buyer) = (&app, buyer.clone());
        async move { app.quote_at(&base, &buyer, event, quantity).await }
    };
    let res = quote(app.base.clone(), 2).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!((res.json["unit_price"].as_str(), res.json["total"].as_str()), (Some("49.90"), Some("99.80")));
    assert_eq!(quote(other_base.clone(), 1).await.json["unit_price"], "49.90");

    // A price change: here at once, in the other process within moments.
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"price": "10"}), Some(&admin)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(quote(app.base.clone(), 3).await.json["total"], "30.00");
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = quote(other_base.clone(), 1).await.json["unit_price"].clone();
        if seen == "10.00" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, "10.00", "the other api kept the old price");
    let id = app.order(&buyer, event, 1, None).await.json["id"].as_str().unwrap().to_owned();
    let stored: Decimal = sqlx::query_scalar("SELECT unit_price FROM orders WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, Decimal::from(10), "the order is priced at the new price");

    // An operator's SQL is announced too: the event starts, then disappears.
    sqlx::query("UPDATE events SET starts_at = now() - interval '1 minute' WHERE id = $1")
        .bind(event)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut status = 0;
    for _ in 0..100 {
        status = quote(app.base.clone(), 1).await.status;
        if status == 422 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quote(app.base.clone(), 1).await.assert_error(422, "event_unavailable");
    assert_eq!(status, 422);
    app.order(&buyer, event, 1, None).await.assert_error(422, "event_unavailable");
    sqlx::query("UPDATE events SET deleted_at = now(), starts_at = now() + interval '1 day' WHERE id = $1")
        .bind(event)
        .execute(&app.db.pool)
        .await
        .unwrap();
    for _ in 0..100 {
        if quote(other_base.clone(), 1).await.status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    quote(other_base.clone(), 1).await.assert_error(404, "not_found");

    // Refusals.
    let live = app.event_with(&admin, 10, 4).await;
    let post = |body: Value, token: Option<&str>| {
        let app = &app;
        let token = token.map(str::to_owned);
        async move { app.post("/api/v1/orders/quote", &body, token.as_deref()).await }
    };
    post(json!({"event_id": live, "quantity": 1}), None).await.assert_error(401, "unauthorized");
    post(json!({"event_id": Uuid::now_v7(), "quantity": 1}), Some(&buyer)).await.assert_error(404, "not_found");
    post(json!({"event_id": live, "quantity": 0}), Some(&buyer)).await.assert_error(422, "invalid_quantity");
    post(json!({"event_id": live, "quantity": 5}), Some(&buyer)).await.assert_error(422, "invalid_quantity");
    post(json!({"event_id": live}), Some(&buyer)).await.assert_error(422, "invalid_body");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(orders, 1, "quotes store nothing");
}

#[tokio::test]
async fn a_known_sold_out_event_is_refused_at_once() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 2, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    app.order(&buyer, event, 3, None).await.assert_error(409, "sold_out");
    let id = app.order(&buyer, event, 2, None).await.json["id"].as_str().unwrap().to_owned();
    let res = app.get(&format!("/api/v1/orders/{id}?wait=20"), Some(&buyer)).await;
    assert_eq!(res.json["status"], "PENDING");
    let refused = app.order(&buyer, event, 1, None).await;
    refused.assert_error(409, "sold_out");
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("sold out"));
}

/// The fast path trusts a sold-out reading for `SOLD_OUT_HINT_MS`: tickets released meanwhile
/// are refused until then, and sold once it has passed.
#[tokio::test]
async fn the_sold_out_hint_is_trusted_for_its_time_only() {
    let hint = Duration::from_secs(3);
    let app = TestApp::spawn_with(&[("SOLD_OUT_HINT_MS", hint.as_millis().to_string())]).await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 2, 4).await;
    let (_, buyer) = app.user("buyer").await;
    let (_, latecomer) = app.user("latecomer").await;
    let id = app.order(&buyer, event, 2, None).await.json["id"].as_str().unwrap().to_owned();
    let res = app.get(&format!("/api/v1/orders/{id}?wait=20"), Some(&buyer)).await;
    assert_eq!(res.json["status"], "PENDING");
    let read = std::time::Instant::now();
    app.order(&latecomer, event, 1, None).await.assert_error(409, "sold_out");

    let cancelled = app.post(&format!("/api/v1/orders/{id}/cancel"), &json!({}), Some(&buyer)).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    let refused = app.order(&latecomer, event, 1, None).await;
    assert!(read.elapsed() < hint, "the test was too slow to see the hint");
    refused.assert_error(409, "sold_out");

    tokio::time::sleep(hint.saturating_sub(read.elapsed()) + Duration::from_millis(100)).await;
    let sold = app.order(&latecomer, event, 1, None).await;
    assert_eq!(sold.status, 202, "{}", sold.body);
    app.wait_until_final(SETTLE).await;
    assert_eq!(app.assert_consistent(event).await, (2, 1));
}

#[tokio::test]
async fn idempotency_key_replays_the_same_order() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let (_, other) = app.user("Other").await;

    let first = app.order(&buyer, event, 2, Some("checkout-1")).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(first.header("idempotent-replayed").is_none());
    let again = app.order(&buyer, event, 2, Some("checkout-1")).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.json["id"], first.json["id"]);
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    app.order(&buyer, event, 3, Some("checkout-1")).await.assert_error(422, "idempotency_key_reused");

    // Keys belong to their user: someone else's identical key is a new purchase.
    let others = app.order(&other, event, 2, Some("checkout-1")).await;
    assert_eq!(others.status, 202);
    assert_ne!(others.json["id"], first.json["id"]);

    // Concurrent retries with one key: one order.
    let racing = join_all((0..10).map(|_| app.order(&buyer, event, 1, Some("checkout-2")))).await;
    let ids: HashSet<&Value> = racing.iter().map(|r| &r.json["id"]).collect();
    assert!(racing.iter().all(|r| r.status == 202), "{racing:?}");
    assert_eq!(ids.len(), 1, "one key, one order");

    app.wait_until_final(SETTLE).await;
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(orders, 3);
    app.assert_consistent(event).await;
    assert_eq!(app.assert_consistent(event).await.1, 5);
}

/// Orders are stored in shared multi-row inserts. One that cannot be stored (here: a
/// validly signed token of an account that does not exist) must not take the orders that
/// shared its statement down with it.
#[tokio::test]
async fn one_bad_order_does_not_fail_its_batch() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 1).await;
    let mut buyers = Vec::new();
    for i in 0..10 {
        buyers.push(app.user(&format!("buyer{i}")).await.1);
    }
    let ghost = mint_token(Uuid::now_v7(), "user");
    for _ in 0..5 {
        let requests = buyers.iter().chain([&ghost]).map(|token| app.order(token, event, 1, None));
        let answers = join_all(requests).await;
        let (good, bad) = answers.split_at(buyers.len());
        assert!(good.iter().all(|r| r.status == 202), "{good:?}");
        bad[0].assert_error(401, "unauthorized");
    }
    app.wait_until_final(SETTLE).await;
    assert_eq!(app.assert_consistent(event).await.1, 50);
}

/// Publishes a purchase message straight to the event's partition, as the api would.
async fn publish_raw(connection: &Connection, app: &TestApp, body: &[u8], routing_key: &str) {
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            "orders.purchase".into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack() && confirm.take_message().is_none(), "message not routed in {}", app.broker.url);
}

/// How many statements stored these orders: each order's `created_at` is its statement's
/// transaction start.
async fn statements_storing(app: &TestApp, event: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT created_at) FROM orders WHERE event_id = $1")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// The event's purchase queue (of its partition).
fn purchase_queue(event: Uuid) -> String {
    format!("orders.purchase.{}", common::amqp::partition_of(event, 8))
}

/// The queue's depth once it has `expected` messages, or when `within` has passed.
async fn depth_once(app: &TestApp, queue: &str, expected: u32, within: Duration) -> u32 {
    let deadline = tokio::time::Instant::now() + within;
    while app.broker.queue_depth(queue).await < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.broker.queue_depth(queue).await
}

/// The purchase messages in the event's partition queue, once there are `expected` of them
/// (consumed): the orders each carries.
async fn purchase_messages(app: &TestApp, event: Uuid, expected: u32) -> Vec<usize> {
    use futures_util::StreamExt;
    let queue = purchase_queue(event);
    assert_eq!(depth_once(app, &queue, expected, Duration::from_secs(10)).await, expected);
    let connection = app.broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let options = lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() };
    let consumer = channel
        .basic_consume(queue.as_str().into(), "test".into(), options, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let deliveries = consumer.take(expected as usize).collect::<Vec<_>>();
    let deliveries = tokio::time::timeout(Duration::from_secs(10), deliveries).await.expect("the messages delivered");
    deliveries
        .into_iter()
        .map(|delivery| {
            let body: Value = serde_json::from_slice(&delivery.unwrap().data).unwrap();
            body["orders"].as_array().expect("a purchase message's orders").len()
        })
        .collect()
}

/// `ORDER_INSERT_INTERVAL_MS`: orders that come less than this after the last shared
/// `INSERT` started wait for the next one, and share it; a lone order is stored at once.
#[tokio::test]
async fn orders_that_come_within_the_insert_interval_share_a_statement() {
    let app = TestApp::spawn_with(&[
        ("ORDER_INSERT_INTERVAL_MS", "1000".to_owned()),
        ("PURCHASE_SEND_INTERVAL_MS", "0".to_owned()),
    ])
    .await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(11).await;

    let started = std::time::Instant::now();
    assert_eq!(app.order(&buyers[0].1, event, 1, None).await.status, 202);
    assert!(started.elapsed() < Duration::from_millis(800), "a lone order is stored at once");
    let rest = stampede(&app, &buyers[1..], event, |_| 1).await;
    assert!(rest.iter().all(|res| res.status == 202));
    assert_eq!(statements_storing(&app, event).await, 2, "the first alone, then the ten together");
    assert_eq!(purchase_messages(&app, event, 2).await, [1, 10]);
}

/// `PURCHASE_SEND_INTERVAL_MS`: the messages of orders stored less than this after the last
/// sending go out together, one message for their partition; the first goes at once.
#[tokio::test]
async fn orders_stored_within_the_send_interval_share_a_message() {
    let app = TestApp::spawn_with(&[
        ("ORDER_INSERT_INTERVAL_MS", "0".to_owned()),
        ("PURCHASE_SEND_INTERVAL_MS", "1000".to_owned()),
    ])
    .await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(6).await;

    for (_, token) in &buyers {
        assert_eq!(app.order(token, event, 1, None).await.status, 202);
    }
    assert_eq!(statements_storing(&app, event).await, 6, "one after another: a statement each");
    assert_eq!(purchase_messages(&app, event, 2).await, [1, 5]);
}

/// `PURCHASE_MESSAGE_ORDERS` and `PURCHASE_SEND_MAX_WAIT_MS`: a partition's orders wait,
/// from its last message, until they fill a message or the next point of the sender's grid
/// (steps of the longest wait from its first sending); a quiet partition's first order goes
/// at once. The five orders come well within one step of the first.
#[tokio::test]
async fn a_partition_s_orders_wait_to_fill_a_message() {
    let app = TestApp::spawn_with(&[
        ("ORDER_INSERT_INTERVAL_MS", "0".to_owned()),
        ("PURCHASE_SEND_INTERVAL_MS", "0".to_owned()),
        ("PURCHASE_MESSAGE_ORDERS", "3".to_owned()),
        ("PURCHASE_SEND_MAX_WAIT_MS", "4000".to_owned()),
    ])
    .await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(5).await;
    let queue = purchase_queue(event);

    for (_, token) in &buyers[..4] {
        assert_eq!(app.order(token, event, 1, None).await.status, 202);
    }
    assert_eq!(
        depth_once(&app, &queue, 2, Duration::from_secs(1)).await,
        2,
        "the first at once, then three that fill a message"
    );
    assert_eq!(app.order(&buyers[4].1, event, 1, None).await.status, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.broker.queue_depth(&queue).await, 2, "the fifth waits for more, until 4 s after the first");
    assert_eq!(purchase_messages(&app, event, 3).await, [1, 3, 1]);
}

#[tokio::test]
async fn a_redelivered_message_issues_tickets_once() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    // The order is decided from the api's message; then a copy of that message comes, as it
    // would after a worker crashed between its commit and its ack. (Two copies waiting
    // together would share a batch, which drops the duplicate before it reads the orders.)
    let order = app.order(&buyer, event, 2, None).await;
    let order_id: Uuid = order.json["id"].as_str().unwrap().parse().unwrap();
    let worker = app.spawn_worker(&[]);
    app.wait_until_final(SETTLE).await;
    let connection = app.broker.connect().await;
    let partition = common::amqp::partition_of(event, 8);
    let body = serde_json::to_vec(&json!({"order_id": order_id, "event_id": event})).unwrap();
    publish_raw(&connection, &app, &body, &partition.to_string()).await;

    let processed = |worker: &tests::Process, field: &str| -> u64 {
        worker.logs("batch committed").iter().map(|l| l[field].as_u64().unwrap_or(0)).sum()
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while processed(&worker, "messages") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the copy was never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(processed(&worker, "skipped"), 1, "the copy is recognised and skipped");
    assert_eq!(processed(&worker, "accepted"), 1);
    assert_eq!(app.assert_consistent(event).await, (10, 2));
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(tickets, 2);
    assert_eq!(app.broker.queue_depth(&purchase_queue(event)).await, 0, "both copies acked");
}

#[tokio::test]
async fn orders_accepted_while_the_worker_is_down_complete_when_it_returns() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let admin = app.admin().await;
    let events = [app.event_with(&admin, 30, 4).await, app.event_with(&admin, 30, 4).await];
    let buyers = app.buyers(40).await;
    let responses =
        join_all(buyers.iter().enumerate().map(|(i, (_, token))| app.order(token, events[i % 2], 1, None))).await;
    assert!(responses.iter().all(|r| r.status == 202));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'QUEUED'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 40, "nothing is decided without a worker");

    let _worker = app.worker().await;
    app.wait_until_final(SETTLE).await;
    for event in events {
        assert_eq!(app.assert_consistent(event).await, (30, 20));
    }
}

#[tokio::test]
async fn orders_whose_message_never_reached_the_broker_are_republished() {
    // The api's broker URL points nowhere: it stores the order, cannot publish, and still
    // answers 202. The worker's re-publisher sends the message.
    let app = TestApp::spawn_with(&[("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f".to_owned())]).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let res = app.order(&buyer, event, 1, None).await;
    assert_eq!(res.status, 202, "{}", res.body);
    let id = res.json["id"].as_str().unwrap().to_owned();
    let published: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT published_at FROM orders WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(published.is_none(), "an unconfirmed order is not marked published");

    let worker = app.spawn_worker(&[]);
    app.wait_until_final(SETTLE).await;
    let res = app.get(&format!("/api/v1/orders/{id}"), Some(&buyer)).await;
    assert_eq!(res.json["status"], "PENDING");
    assert!(!worker.logs("re-published queued orders").is_empty());
}

/// The re-publisher's search, condition by condition, in one round: an order is sent again
/// once its partition's consumer has passed it, once it is stale, or at once when no consumer
/// reads its partition; not while it is young or was just sent again.
#[tokio::test]
async fn the_re_publisher_claims_exactly_the_orders_whose_message_may_be_missing() {
    let app = TestApp::spawn().await;
    let worker = app
        .worker_with(|c| {
            c.republish_interval_ms = 3_600_000;
            c.republish_stale_secs = 60;
        })
        .await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    // A decided order: its partition's consumer has recorded its progress, and its row is the
    // pattern of the orders below, whose messages were lost.
    let res = app.order(&buyer, event, 1, None).await;
    assert_eq!(res.status, 202, "{}", res.body);
    let pattern: Uuid = res.json["id"].as_str().unwrap().parse().unwrap();
    app.wait_until_final(SETTLE).await;
    let partition = i16::try_from(common::amqp::partition_of(event, 8)).unwrap();
    let other = (partition + 1) % 8;
    let lost = |partition: Option<i16>, age_secs: i64, republished_secs_ago: Option<i64>| {
        let db = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(
                "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, currency, lines, partition,
                                     created_at, published_at)
                 SELECT gen_random_uuid(), user_id, event_id, quantity, unit_price, total, currency, lines, $2,
                        now() - make_interval(secs => $3), now() - make_interval(secs => $4)
                 FROM orders WHERE id = $1 RETURNING id",
            )
            .bind(pattern)
            .bind(partition)
            .bind(age_secs as f64)
            .bind(republished_secs_ago.map(|secs| secs as f64))
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let passed = lost(Some(partition), 10, None).await;
    let young = lost(Some(partition), 0, None).await;
    let just_sent = lost(Some(partition), 10, Some(0)).await;
    let sent_long_ago = lost(Some(partition), 10, Some(10)).await;
    let stale = lost(Some(other), 120, None).await;
    let no_partition = lost(None, 10, None).await;
    let beyond_partitions = lost(Some(200), 10, None).await;
    // Its partition's consumer is behind it (has decided nothing created after it), and the
    // partition is not idle: its consumer's progress changed since the worker's last round.
    sqlx::query(
        "INSERT INTO partition_progress (partition, seen_through) VALUES ($1, now() - interval '60 seconds')
         ON CONFLICT (partition) DO UPDATE SET seen_through = excluded.seen_through",
    )
    .bind(other)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let behind = lost(Some(other), 10, None).await;
    let before: HashMap<Uuid, Option<chrono::DateTime<chrono::Utc>>> = published(&app, &[just_sent]).await;

    assert!(worker.steps().republish().await);
    let claimed: HashSet<Uuid> = [passed, sent_long_ago, stale, no_partition, beyond_partitions].into();
    let all = [passed, young, just_sent, sent_long_ago, stale, no_partition, beyond_partitions, behind];
    let now = published(&app, &all).await;
    for id in all {
        let was_claimed = now[&id].is_some() && now[&id] != before.get(&id).copied().flatten();
        assert_eq!(was_claimed, claimed.contains(&id), "order {id}: {now:?}");
    }
}

async fn published(app: &TestApp, ids: &[Uuid]) -> HashMap<Uuid, Option<chrono::DateTime<chrono::Utc>>> {
    sqlx::query_as::<_, (Uuid, Option<chrono::DateTime<chrono::Utc>>)>(
        "SELECT id, published_at FROM orders WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_without_blocking_the_partition() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let partition = common::amqp::partition_of(event, 8).to_string();
    let connection = app.broker.connect().await;
    publish_raw(&connection, &app, b"{not json", &partition).await;
    publish_raw(&connection, &app, br#"{"order_id": 42}"#, &partition).await;

    let id = app.order(&buyer, event, 1, None).await.json["id"].as_str().unwrap().to_owned();
    let res = app.get(&format!("/api/v1/orders/{id}?wait=20"), Some(&buyer)).await;
    assert_eq!(res.json["status"], "PENDING");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.broker.queue_depth("orders.purchase.dead").await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "poison messages did not reach the dead-letter queue");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn two_workers_share_the_partitions_and_survive_one_dying() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let mut first = app.spawn_worker(&[]);
    let second = app.spawn_worker(&[]);
    for worker in [&first, &second] {
        worker.wait_for_log("partition assignment", SETTLE, |line| line["members"] == 2).await;
    }
    // Let the stepping back settle (a few heartbeats).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let admin = app.admin().await;
    let mut events = Vec::new();
    for _ in 0..12 {
        events.push(app.event_with(&admin, 20, 4).await);
    }
    let buyers = app.buyers(360).await;
    let responses =
        join_all(buyers.iter().enumerate().map(|(i, (_, token))| app.order(token, events[i % events.len()], 1, None)))
            .await;
    assert!(responses.iter().all(|r| r.status == 202));
    app.wait_until_final(SETTLE).await;
    for event in &events {
        assert_eq!(app.assert_consistent(*event).await, (20, 20));
    }

    // Each partition was processed by one worker, and both workers had some.
    let partitions = |worker: &tests::Process| -> HashSet<u64> {
        worker.logs("batch committed").iter().filter_map(|l| l["partition"].as_u64()).collect()
    };
    let (a, b) = (partitions(&first), partitions(&second));
    assert!(!a.is_empty() && !b.is_empty(), "partitions not spread: {a:?} / {b:?}");
    assert!(a.is_disjoint(&b), "a partition was processed by both workers: {a:?} / {b:?}");

    // One worker dies without warning; the other takes over its partitions.
    first.kill();
    let more = app.buyers(120).await;
    let responses =
        join_all(more.iter().enumerate().map(|(i, (_, token))| app.order(token, events[i % events.len()], 1, None)))
            .await;
    assert!(responses.iter().all(|r| r.status == 202));
    let fresh = app.event_with(&admin, 1000, 4).await;
    let late = app.buyers(80).await;
    let responses = stampede(&app, &late, fresh, |_| 1).await;
    assert!(responses.iter().all(|r| r.status == 202));
    app.wait_until_final(SETTLE).await;
    for event in &events {
        assert_eq!(app.assert_consistent(*event).await, (20, 20));
    }
    assert_eq!(app.assert_consistent(fresh).await, (1000, 80));
    let rejected: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'REJECTED' AND reason = 'SOLD_OUT'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(rejected, 120 + 360 - 12 * 20);
}

#[tokio::test]
async fn a_worker_stopped_with_sigterm_under_load_loses_nothing() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 300, 4).await;
    let buyers = app.buyers(400).await;
    // Small batches with a pause make the worker busy for a while.
    let mut worker = app.spawn_worker(&[("BATCH_SIZE", "5".to_owned()), ("BATCH_WAIT_MS", "20".to_owned())]);
    let responses = stampede(&app, &buyers, event, |_| 1).await;
    assert!(responses.iter().all(|r| r.status == 202));
    let status = worker.terminate().expect("worker exits within 30 s of SIGTERM");
    assert!(status.success(), "worker exit status {status:?}");
    assert!(!worker.logs("worker stopped").is_empty());

    let _successor = app.spawn_worker(&[]);
    app.wait_until_final(SETTLE).await;
    assert_eq!(app.assert_consistent(event).await, (300, 300));
    let counts = status_counts(&app, event).await;
    assert_eq!(counts.get(&key("PENDING", None)), Some(&(300, 300)), "{counts:?}");
    assert_eq!(counts.get(&key("REJECTED", Some("SOLD_OUT"))), Some(&(100, 100)), "{counts:?}");
}

/// Several api processes: a long-poll waiting on one is woken by a change made through
/// another (the wake-up comes from PostgreSQL's NOTIFY, which every process listens to).
#[tokio::test]
async fn long_polls_are_woken_by_changes_made_on_another_api_process() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let (_other, other_base) = app.spawn_another_api();
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let order = app.pending_order(&buyer, event, 1).await;

    let started = std::time::Instant::now();
    let poll = app.client.get(format!("{other_base}/api/v1/orders/{order}?wait=30&status=PENDING")).bearer_auth(&buyer);
    let pay = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.payment(order, &json!({"status": "PAID"})).await
    };
    let (polled, paid) = tokio::join!(async { Response::from(poll.send().await.expect("poll sent")).await }, pay);
    assert_eq!(paid.status, 204, "{}", paid.body);
    assert_eq!(polled.json["status"], "PAID", "{}", polled.body);
    // Woken by the change, not by the end of its 30 s.
    assert!(started.elapsed() < Duration::from_secs(20), "the waiter on the other process was not woken");
}
