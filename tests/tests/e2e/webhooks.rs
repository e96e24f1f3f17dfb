//! Order results without polling: webhook endpoints receiving signed, durable, retried
//! deliveries (checked by a real HTTP receiver that verifies signatures with this crate's
//! own implementation of the spec), and queue consumers bound to `orders.events`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use common::config::EventsFormat;
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use serde_json::{Value, json};
use tests::{TestApp, sign_webhook};
use uuid::Uuid;

/// What the receiver got: one entry per request.
#[derive(Clone, Debug)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// An HTTP server on a random loopback port that records every request and answers with
/// the scripted statuses in turn (then `default`).
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(script: Vec<u16>, default: u16) -> Self {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let recorded = requests.clone();
        let handler = move |headers: HeaderMap, body: Bytes| {
            let recorded = recorded.clone();
            let script = script.clone();
            async move {
                let header =
                    |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                recorded.lock().unwrap().push(Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let status = script.lock().unwrap().pop_front().unwrap_or(default);
                StatusCode::from_u16(status).unwrap()
            }
        };
        let app = axum::Router::new().route("/hooks", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, requests }
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `check` holds for the requests received so far.
    async fn wait_for(&self, what: &str, check: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        for _ in 0..300 {
            let requests = self.requests();
            if check(&requests) {
                return requests;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("receiver never saw {what}; got {:?}", self.requests());
    }
}

/// Checks a request's signature with the secret shown at registration (`whsec_<base64>`),
/// independently of the api's code, and that its timestamp is recent.
fn assert_signed(request: &Received, secret: &str) {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let timestamp: i64 = request.timestamp.parse().expect("numeric webhook-timestamp");
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 300, "stale timestamp {timestamp}");
    let expected = sign_webhook(&key, &request.id, timestamp, &request.body);
    assert!(request.signature.split(' ').any(|s| s == expected), "bad signature on {request:?}");
}

async fn register(app: &TestApp, token: &str, url: &str) -> (Uuid, String) {
    let res =
        app.post("/api/v1/webhook-endpoints", &json!({"url": url, "description": "test receiver"}), Some(token)).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let secret = res.json["secret"].as_str().expect("secret shown at registration").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    (res.json["id"].as_str().unwrap().parse().unwrap(), secret)
}

fn types_for(requests: &[Received], order: Uuid) -> Vec<String> {
    let mut types: Vec<String> = requests
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
        .filter(|body| body["data"]["id"] == order.to_string())
        .inspect(|body| assert_eq!(body["data"]["currency"], "EUR", "{body}"))
        .inspect(|body| assert_eq!(body["data"]["items"][0]["name"], "General admission", "{body}"))
        .map(|body| body["type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    types.dedup();
    types
}

async fn deliveries(app: &TestApp, token: &str, endpoint: Uuid) -> Vec<Value> {
    let res = app.get(&format!("/api/v1/webhook-endpoints/{endpoint}/deliveries"), Some(token)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    res.json.as_array().unwrap().clone()
}

#[tokio::test]
async fn status_changes_reach_webhooks_and_queue_consumers() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let (buyer, stranger) = (buyers[0].1.as_str(), buyers[1].1.as_str());
    let receiver = Receiver::start(vec![], 200).await;
    let (endpoint, secret) = register(&app, buyer, &receiver.url).await;

    let connection = app.broker.connect().await;
    let mut consumer = tests::bind_order_events(&connection, "order.#").await;

    let order = app.pending_order(buyer, event, 2).await;
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);

    // The queue consumer sees every transition of the order, in order, several events of
    // one type to a message (version 2).
    assert_eq!(
        consume_events(&mut consumer, order, 2).await,
        [("order.queued", "QUEUED"), ("order.pending", "PENDING"), ("order.paid", "PAID")]
            .map(|(t, s)| (t.to_owned(), s.to_owned()))
    );

    // The webhook endpoint gets the same three, each signed, each under its own webhook-id.
    let requests = receiver.wait_for("three events", |r| types_for(r, order).len() == 3).await;
    assert_eq!(types_for(&requests, order), ["order.paid", "order.pending", "order.queued"]);
    for request in &requests {
        assert_signed(request, &secret);
    }
    let ids: std::collections::HashSet<&str> = requests.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), requests.len(), "one request per delivery, each with its own webhook-id");

    // The delivery log: one successful attempt each.
    let log = deliveries(&app, buyer, endpoint).await;
    assert_eq!(log.len(), 3, "{log:?}");
    for delivery in &log {
        assert_eq!(delivery["status"], "SUCCEEDED", "{delivery}");
        assert_eq!(delivery["attempts"].as_array().unwrap().len(), 1, "{delivery}");
        assert_eq!(delivery["attempts"][0]["status_code"], 200);
        assert!(delivery["next_attempt_at"].is_null());
    }

    // The secret is never shown again, and nobody else sees or deletes the endpoint.
    let list = app.get("/api/v1/webhook-endpoints", Some(buyer)).await;
    assert_eq!(list.json.as_array().unwrap().len(), 1);
    assert!(list.json[0].get("secret").is_none(), "{}", list.body);
    assert_eq!(app.get("/api/v1/webhook-endpoints", Some(stranger)).await.json, json!([]));
    let path = format!("/api/v1/webhook-endpoints/{endpoint}");
    app.get(&format!("{path}/deliveries"), Some(stranger)).await.assert_error(404, "not_found");
    let res = app.client.delete(app.url(&path)).bearer_auth(stranger).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let res = app.client.delete(app.url(&path)).bearer_auth(buyer).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(app.get("/api/v1/webhook-endpoints", Some(buyer)).await.json, json!([]));
}

/// Consumes order events until three of `order`'s have arrived; returns them as (type,
/// status), in the order received. Every message must be of `version`: 1, one event a
/// message; 2, `{"version": 2, "type", "events": [...]}` with events of that type only.
async fn consume_events(consumer: &mut lapin::Consumer, order: Uuid, version: u64) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (delivery, body) = next_message(consumer, "an order event").await;
        assert_eq!(delivery.routing_key.as_str(), body["type"].as_str().unwrap());
        assert_eq!(body["version"], version, "{body}");
        let events = match version {
            1 => vec![body.clone()],
            _ => body["events"].as_array().expect("events").clone(),
        };
        for event in events {
            assert_eq!(event["version"], 1);
            assert_eq!(event["type"], body["type"], "{body}");
            assert!(event["id"].as_str().unwrap().starts_with("evt_"), "{event}");
            assert_eq!(event["data"]["quantity"], 2);
            assert_eq!(event["data"]["total"], "99.80");
            assert_eq!(event["data"]["currency"], "EUR");
            let line = &event["data"]["items"][0];
            assert_eq!(
                (&line["name"], &line["quantity"], &line["unit_price"]),
                (&json!("General admission"), &json!(2), &json!("49.90")),
                "{event}"
            );
            if event["data"]["id"] == order.to_string() {
                seen.push((
                    event["type"].as_str().unwrap().to_owned(),
                    event["data"]["status"].as_str().unwrap().to_owned(),
                ));
            }
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    seen
}

/// `ORDER_EVENTS_FORMAT=single`: one version 1 event per message, as before batches.
#[tokio::test]
async fn order_events_can_be_sent_one_per_message() {
    let app = TestApp::spawn().await;
    let _worker = app.worker_with(|c| c.order_events_format = EventsFormat::Single).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let connection = app.broker.connect().await;
    let mut consumer = tests::bind_order_events(&connection, "order.#").await;
    let order = app.pending_order(&buyers[0].1, event, 2).await;
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    assert_eq!(
        consume_events(&mut consumer, order, 1).await,
        [("order.queued", "QUEUED"), ("order.pending", "PENDING"), ("order.paid", "PAID")]
            .map(|(t, s)| (t.to_owned(), s.to_owned()))
    );
}

#[tokio::test]
async fn failed_deliveries_are_retried_under_the_same_id() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    // The first three requests fail (500, 503, 429); every later one succeeds.
    let receiver = Receiver::start(vec![500, 503, 429], 200).await;
    let (endpoint, secret) = register(&app, buyer, &receiver.url).await;

    let order = app.pending_order(buyer, event, 1).await;
    receiver.wait_for("both events acknowledged", |r| r.len() >= 5).await;
    let log = receiver.wait_for("both events", |r| types_for(r, order).len() == 2).await;
    for request in &log {
        assert_signed(request, &secret);
    }
    // Wait for the delivery log to settle, then compare it with what the receiver saw.
    let mut settled = Vec::new();
    for _ in 0..100 {
        settled = deliveries(&app, buyer, endpoint).await;
        if settled.len() == 2 && settled.iter().all(|d| d["status"] == "SUCCEEDED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled.iter().all(|d| d["status"] == "SUCCEEDED"), "{settled:?}");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for request in receiver.requests() {
        *per_id.entry(request.id).or_default() += 1;
    }
    let mut codes = Vec::new();
    for delivery in &settled {
        let attempts = delivery["attempts"].as_array().unwrap();
        assert_eq!(per_id[delivery["id"].as_str().unwrap()], attempts.len(), "every attempt reused the webhook-id");
        assert_eq!(attempts.last().unwrap()["status_code"], 200);
        codes.extend(attempts.iter().map(|a| a["status_code"].as_i64().unwrap()));
    }
    codes.sort();
    assert_eq!(codes, [200, 200, 429, 500, 503], "three failures, then both delivered");
}

#[tokio::test]
async fn an_endpoint_answering_410_is_disabled() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let receiver = Receiver::start(vec![], 410).await;
    let (endpoint, _) = register(&app, buyer, &receiver.url).await;

    let order = app.pending_order(buyer, event, 1).await;
    receiver.wait_for("a request", |r| !r.is_empty()).await;
    let mut list = Value::Null;
    for _ in 0..100 {
        list = app.get("/api/v1/webhook-endpoints", Some(buyer)).await.json;
        if list[0]["enabled"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(list[0]["enabled"], false, "{list}");
    assert!(list[0]["disabled_reason"].as_str().unwrap().contains("410"), "{list}");

    // Nothing more is sent: not the pending event's, not the payment's.
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = receiver.requests().len();
    assert!(sent <= 2, "at most the two events already in flight were sent, got {sent}");
    let log = deliveries(&app, buyer, endpoint).await;
    assert!(log.iter().all(|d| d["status"] == "ABANDONED"), "{log:?}");
    assert!(log.iter().all(|d| d["event_type"] != "order.paid"), "no delivery is created for a disabled endpoint");
}

#[tokio::test]
async fn a_delivery_survives_the_worker_being_killed_between_attempts() {
    let app = TestApp::spawn().await;
    let slow_retries = [("WEBHOOK_RETRY_SCHEDULE", "3s".to_owned())];
    let mut worker = app.spawn_worker(&slow_retries);
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let receiver = Receiver::start(vec![500, 500], 200).await;
    let (endpoint, secret) = register(&app, buyer, &receiver.url).await;

    let order = app.pending_order(buyer, event, 1).await;
    let first = receiver.wait_for("the failing first attempts", |r| r.len() >= 2).await;
    // Kill the worker once both failures are recorded, while their retries are scheduled.
    for _ in 0..100 {
        let log = deliveries(&app, buyer, endpoint).await;
        if log.len() == 2 && log.iter().all(|d| d["attempts"].as_array().unwrap().len() == 1) {
            assert!(log.iter().all(|d| d["status"] == "PENDING" && d["next_attempt_at"].is_string()), "{log:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill();
    let _successor = app.spawn_worker(&slow_retries);
    let requests = receiver.wait_for("both events again", |r| r.len() >= 4).await;
    assert_eq!(types_for(&requests, order), ["order.pending", "order.queued"]);
    for request in &requests {
        assert_signed(request, &secret);
    }
    // The retries went out under the ids of the failed attempts.
    let retried: std::collections::HashSet<&str> = requests[2..].iter().map(|r| r.id.as_str()).collect();
    let failed: std::collections::HashSet<&str> = first.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(retried, failed);
}

#[tokio::test]
async fn endpoints_must_be_public_http_urls() {
    // Only a documentation network is allowed: loopback is refused like any private target.
    let app = TestApp::spawn_with(&[("WEBHOOK_ALLOW_NETWORKS", "192.0.2.0/24".to_owned())]).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let create = |url: &str| {
        let body = json!({ "url": url });
        let app = &app;
        async move { app.post("/api/v1/webhook-endpoints", &body, Some(buyer)).await }
    };

    for refused in [
        "http://127.0.0.1:8080/hooks",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/",
        "http://[::1]/",
        "http://localhost/",
        // IPv6 forms that reach non-public IPv4 or IPv6 space: IPv4-compatible, site-local,
        // 6to4 of loopback, Teredo, IPv4-translated; and the 6to4 relay anycast.
        "http://[::127.0.0.1]/",
        "http://[fec0::1]/",
        "http://[2002:7f00:1::]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "http://[::ffff:0:7f00:1]/",
        "http://192.88.99.1/",
    ] {
        let res = create(refused).await;
        res.assert_error(422, "url_not_allowed");
        // The refusal does not say where a name points (an internal DNS oracle).
        for address in ["127.0.0.1", "::1"] {
            assert!(refused.contains(address) || !res.body.contains(address), "{refused}: {}", res.body);
        }
        assert!(res.body.contains("WEBHOOK_ALLOW_NETWORKS"), "the refusal names the setting: {}", res.body);
    }
    for invalid in ["ftp://example.com/", "not a url", "https://user:pw@example.com/", "http://"] {
        create(invalid).await.assert_error(422, "invalid_url");
    }
    let allowed = create("http://192.0.2.10/hooks").await;
    assert_eq!(allowed.status, 201, "{}", allowed.body);
    app.post("/api/v1/webhook-endpoints", &json!({"description": "no url"}), Some(buyer))
        .await
        .assert_error(422, "invalid_body");
    let long = "d".repeat(501);
    let res = app
        .post("/api/v1/webhook-endpoints", &json!({"url": "http://192.0.2.10/", "description": long}), Some(buyer))
        .await;
    res.assert_error(422, "invalid_description");
    app.post("/api/v1/webhook-endpoints", &json!({"url": "http://192.0.2.10/"}), None)
        .await
        .assert_error(401, "unauthorized");
    for n in 1..10 {
        assert_eq!(create(&format!("http://192.0.2.10/hooks/{n}")).await.status, 201);
    }
    create("http://192.0.2.10/hooks/10").await.assert_error(422, "too_many_endpoints");
}

/// Finding 2 of the security review: with `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` in the
/// worker's environment, the guarded resolver only saw the proxy's address, so a name
/// re-pointed at a private address was delivered through the proxy. The webhook client
/// now never uses a proxy: the resolver judges the endpoint's own addresses.
#[tokio::test]
async fn the_guard_holds_with_proxy_variables_in_the_environment() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(vec![], 200).await;
    // A "proxy" that answers 200 to anything it is asked to fetch.
    let proxied = Arc::new(Mutex::new(0_usize));
    let counter = proxied.clone();
    let proxy_app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            StatusCode::OK
        }
    });
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", proxy_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(proxy_listener, proxy_app).await.unwrap() });
    let mut env: Vec<(&str, String)> =
        ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]
            .into_iter()
            .map(|name| (name, proxy.clone()))
            .collect();
    env.extend([("NO_PROXY", String::new()), ("no_proxy", String::new())]);
    // This worker allows no loopback target (only a documentation network).
    env.push(("WEBHOOK_ALLOW_NETWORKS", "192.0.2.0/24".to_owned()));
    let _worker = app.spawn_worker(&env);

    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(1).await;
    let (_, token) = &buyers[0];
    let (endpoint, _) = register(&app, token, &receiver.url).await;
    // The endpoint's name now points somewhere private (DNS rebinding): `localhost`.
    let rebound = receiver.url.replace("127.0.0.1", "localhost");
    sqlx::query("UPDATE webhook_endpoints SET url = $2 WHERE id = $1")
        .bind(endpoint)
        .bind(&rebound)
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(app.order(token, event, 1, None).await.status, 202);

    let mut attempts = Vec::new();
    for _ in 0..100 {
        attempts = deliveries(&app, token, endpoint)
            .await
            .iter()
            .flat_map(|d| d["attempts"].as_array().cloned().unwrap_or_default())
            .collect();
        if !attempts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!attempts.is_empty(), "no delivery was attempted");
    for attempt in &attempts {
        assert!(attempt["status_code"].is_null(), "a delivery reached something: {attempt}");
        // The attempt log says which setting decides.
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(error.contains("not allowed") && error.contains("WEBHOOK_ALLOW_NETWORKS"), "{attempt}");
    }
    assert_eq!(*proxied.lock().unwrap(), 0, "the proxy was asked to deliver");
    assert!(receiver.requests().is_empty(), "the private receiver got a delivery");
}

#[tokio::test]
async fn two_workers_send_each_delivery_once() {
    let app = TestApp::spawn().await;
    let first = app.worker().await;
    let second = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let receiver = Receiver::start(vec![], 200).await;
    let (_, secret) = register(&app, buyer, &receiver.url).await;

    let orders = futures_util::future::join_all((0..15).map(|_| app.order(buyer, event, 1, None))).await;
    assert!(orders.iter().all(|r| r.status == 202));
    app.wait_until_final(Duration::from_secs(30)).await;
    // 15 orders, each QUEUED then PENDING: 30 deliveries.
    let requests = receiver.wait_for("30 deliveries", |r| r.len() >= 30).await;
    // Each worker's deliverer runs a round to its end: a second send of any delivery would
    // have reached the receiver by then.
    assert!(first.steps().deliveries().await && second.steps().deliveries().await);
    let requests = if receiver.requests().len() > requests.len() { receiver.requests() } else { requests };
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for request in &requests {
        assert_signed(request, &secret);
        *per_id.entry(request.id.as_str()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 30, "30 distinct deliveries");
    assert!(per_id.values().all(|n| *n == 1), "a delivery was sent twice: {per_id:?}");
}

/// The relay's cursor is not fooled by commit order: a change written first, by a
/// transaction that took its id later and commits last, is relayed after a change written
/// later that committed first (a cursor over change ids alone would have moved past it).
#[tokio::test]
async fn a_change_that_commits_after_a_later_one_is_still_relayed() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let first = app.pending_order(&buyers[0].1, event, 1).await;
    let second = app.pending_order(&buyers[1].1, event, 1).await;
    let connection = app.broker.connect().await;
    let mut consumer = tests::bind_order_events(&connection, "order.cancelled").await;
    let cancel = "UPDATE orders SET status = 'CANCELLED', updated_at = now() WHERE id = $1";
    let xid = "SELECT pg_current_xact_id()::text";
    // `early` takes its transaction id first; `late` writes its change first (the lower
    // history id) and commits last.
    let mut early = app.db.pool.begin().await.unwrap();
    let early_xid: String = sqlx::query_scalar(xid).fetch_one(&mut *early).await.unwrap();
    let mut late = app.db.pool.begin().await.unwrap();
    let late_xid: String = sqlx::query_scalar(xid).fetch_one(&mut *late).await.unwrap();
    assert!(early_xid.parse::<u64>().unwrap() < late_xid.parse::<u64>().unwrap());
    sqlx::query(cancel).bind(second).execute(&mut *late).await.unwrap();
    sqlx::query(cancel).bind(first).execute(&mut *early).await.unwrap();
    early.commit().await.unwrap();
    assert_eq!(cancelled_events(&mut consumer, 1).await, [first], "the committed change, while the other is open");
    late.commit().await.unwrap();
    assert_eq!(cancelled_events(&mut consumer, 1).await, [second], "the change that committed last");
    let lower: Uuid =
        sqlx::query_scalar("SELECT order_id FROM order_history WHERE status = 'CANCELLED' ORDER BY id LIMIT 1")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(lower, second, "the change relayed last has the lower id");
}

/// An order the api accepts is its own `QUEUED` change, and the worker's decision its
/// second: no history row is written for either, yet `GET /orders/{id}` and consumers see
/// them first, under ids of the same sequence as the history's. The relay reads every kind
/// in one cursor order: a queued change made by a transaction that took its id first, and
/// drew its change id last, is relayed while a later history change is still open, and
/// that change (lower id, later transaction) is relayed after it commits.
#[tokio::test]
async fn queued_changes_of_order_rows_and_history_changes_are_relayed_in_one_order() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let connection = app.broker.connect().await;
    let mut consumer = tests::bind_order_events(&connection, "order.#").await;
    let accepted = app.pending_order(&buyers[0].1, event, 1).await;
    let pool = &app.db.pool;
    let (queued_rows, queued_id): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM order_history WHERE order_id = $1 AND status = 'QUEUED'),
                (SELECT queued_event_id FROM orders WHERE id = $1)",
    )
    .bind(accepted)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(queued_rows, 0, "no history row for the accepted order's QUEUED change");
    let queued_id = queued_id.expect("the accepted order carries its QUEUED change");
    let detail = app.get(&format!("/api/v1/orders/{accepted}"), Some(&buyers[0].1)).await;
    let statuses: Vec<&str> =
        detail.json["history"].as_array().unwrap().iter().map(|c| c["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["QUEUED", "PENDING"]);
    let events = order_events(&mut consumer, accepted, 2).await;
    assert_eq!(events[0], ("order.queued".to_owned(), queued_id));
    assert_eq!(events[1].0, "order.pending");
    assert!(events[1].1 > events[0].1, "ids of one sequence, the queued change's first: {events:?}");
    // The worker's decision is carried on the row as well (migration 0026).
    let (history_rows, decided_id): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM order_history WHERE order_id = $1),
                (SELECT decided_event_id FROM orders WHERE id = $1)",
    )
    .bind(accepted)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((history_rows, decided_id), (0, Some(events[1].1)), "the decision is the row's own change");

    // `early` takes its transaction id first and inserts an order as the api does, drawing
    // its change id after `late` wrote a history change (cancelling the accepted order).
    let xid = "SELECT pg_current_xact_id()::text";
    let mut early = pool.begin().await.unwrap();
    let early_xid: String = sqlx::query_scalar(xid).fetch_one(&mut *early).await.unwrap();
    let mut late = pool.begin().await.unwrap();
    let late_xid: String = sqlx::query_scalar(xid).fetch_one(&mut *late).await.unwrap();
    assert!(early_xid.parse::<u64>().unwrap() < late_xid.parse::<u64>().unwrap());
    sqlx::query("UPDATE orders SET status = 'CANCELLED', updated_at = now() WHERE id = $1")
        .bind(accepted)
        .execute(&mut *late)
        .await
        .unwrap();
    let inserted = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO orders (id, user_id, event_id, quantity, total, lines, partition, published_at,
                             queued_xid, queued_event_id)
         VALUES ($1, $2, $3, 1, 0, '[]', 0, now(), pg_current_xact_id(), nextval('order_history_id_seq'))",
    )
    .bind(inserted)
    .bind(buyers[1].0)
    .bind(event)
    .execute(&mut *early)
    .await
    .unwrap();
    early.commit().await.unwrap();
    let queued = order_events(&mut consumer, inserted, 1).await;
    assert_eq!(queued[0].0, "order.queued", "the committed queued change, while the other is open");
    late.commit().await.unwrap();
    let cancelled = order_events(&mut consumer, accepted, 1).await;
    assert_eq!(cancelled[0].0, "order.cancelled", "the change that committed last");
    assert!(cancelled[0].1 < queued[0].1, "relayed last with the lower id: {cancelled:?} {queued:?}");
}

/// The `(type, n)` of the next `n` events (`evt_<n>`) of `order` on the consumer's queue, in order.
async fn order_events(consumer: &mut lapin::Consumer, order: Uuid, n: usize) -> Vec<(String, i64)> {
    let mut events = Vec::new();
    while events.len() < n {
        let (delivery, body) = next_message(consumer, "an order event").await;
        for event in body["events"].as_array().cloned().unwrap_or_else(|| vec![body.clone()]) {
            if event["data"]["id"].as_str() == Some(order.to_string().as_str()) {
                let id = event["id"].as_str().and_then(|id| id.strip_prefix("evt_")).expect("an evt_<n> id");
                events.push((event["type"].as_str().unwrap().to_owned(), id.parse().unwrap()));
            }
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    events
}

/// The orders of the next `n` `order.cancelled` events, as they arrive.
async fn cancelled_events(consumer: &mut lapin::Consumer, n: usize) -> Vec<Uuid> {
    let mut orders = Vec::new();
    while orders.len() < n {
        let (delivery, body) = next_message(consumer, "an order.cancelled event").await;
        let events = body["events"].as_array().cloned().unwrap_or_else(|| vec![body.clone()]);
        for event in events {
            orders.push(event["data"]["id"].as_str().unwrap().parse().unwrap());
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    orders
}

/// The consumer's next message and its JSON body, within 30 s (`what` names it if none comes).
async fn next_message(consumer: &mut lapin::Consumer, what: &str) -> (lapin::message::Delivery, Value) {
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{what} within 30 s"))
        .unwrap()
        .unwrap();
    let body = serde_json::from_slice(&delivery.data).unwrap();
    (delivery, body)
}
