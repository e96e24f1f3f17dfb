//! What operators see: the Prometheus metrics of api and worker (scraped from the real
//! processes, checked with `promtool`), the worker's probes, and one trace per order that
//! links the api's and the worker's log lines.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tests::{Exposition, TestApp, worker_decides};
use uuid::Uuid;

const ORDERS: (&str, &str) = ("http_route", "/api/v1/orders");

/// `after - before` of one series sum.
fn delta(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

#[tokio::test]
async fn metrics_count_exactly_the_orders_placed() {
    // The fast path off: every well-formed purchase is accepted and decided by the worker.
    let app = TestApp::spawn_process_with(&worker_decides()).await;
    let worker = app.spawn_worker(&[]);
    let (api_metrics, worker_metrics) = (app.api_metrics_base(), worker.metrics_base());
    let admin = app.admin().await;
    let event = app.event_with(&admin, 3, 10).await;
    let buyers = app.buyers(6).await;
    let api_before = Exposition::scrape(&api_metrics).await;
    let worker_before = Exposition::scrape(&worker_metrics).await;

    // Six orders of one ticket, one after another, each once the previous one's message was
    // confirmed (so one stored batch and one message each: orders stored within
    // PURCHASE_SEND_INTERVAL_MS of each other would share one), the last with an
    // Idempotency-Key and then replayed; one refused quantity.
    let mut orders = Vec::new();
    for (i, (_, token)) in buyers.iter().enumerate() {
        let key = (i == 5).then_some("observability-key");
        let res = app.order(token, event, 1, key).await;
        assert_eq!(res.status, 202, "{}", res.body);
        orders.push(res.json["id"].as_str().expect("order id").to_owned());
        Exposition::scrape_until(&api_metrics, "the order's message confirmed", |now| {
            delta(&api_before, now, "turnstile_purchase_publishes_total", &[("outcome", "confirmed")]) > i as f64
        })
        .await;
    }
    let replay = app.order(&buyers[5].1, event, 1, Some("observability-key")).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    app.order(&buyers[0].1, event, 0, None).await.assert_error(422, "invalid_quantity");
    let polled = app.get(&format!("/api/v1/orders/{}", orders[0]), Some(&buyers[0].1)).await;
    assert_eq!(polled.status, 200);
    assert_eq!(app.get("/no/such/path", None).await.status, 404);
    app.wait_until_final(Duration::from_secs(30)).await;

    // The api: purchases by outcome, requests by route template and status, batches, confirms.
    let api_after = Exposition::scrape_until(&api_metrics, "six confirmed purchase messages", |now| {
        delta(&api_before, now, "turnstile_purchase_publishes_total", &[("outcome", "confirmed")]) >= 6.0
    })
    .await;
    let api = |name: &str, labels: &[(&str, &str)]| delta(&api_before, &api_after, name, labels);
    let purchases = "turnstile_purchase_requests_total";
    assert_eq!(api(purchases, &[("outcome", "accepted")]), 6.0);
    assert_eq!(api(purchases, &[("outcome", "idempotent_replay")]), 1.0);
    assert_eq!(api(purchases, &[("outcome", "rejected")]), 1.0);
    assert_eq!(api(purchases, &[("outcome", "sold_out")]), 0.0);
    assert_eq!(api(purchases, &[("outcome", "unavailable")]), 0.0);
    let requests = "http_server_request_duration_seconds_count";
    let post = ("http_request_method", "POST");
    assert_eq!(api(requests, &[post, ORDERS, ("http_response_status_code", "202")]), 7.0);
    assert_eq!(api(requests, &[post, ORDERS, ("http_response_status_code", "422")]), 1.0);
    let by_id = [("http_request_method", "GET"), ("http_route", "/api/v1/orders/{id}")];
    assert_eq!(api(requests, &by_id), 1.0);
    assert_eq!(api(requests, &[("http_route", "unmatched"), ("http_response_status_code", "404")]), 1.0);
    assert!(!api_after.text.contains(&orders[0]), "a raw path (with an order id) became a label");
    assert_eq!(api("turnstile_accept_batch_orders_sum", &[]), 6.0);
    assert_eq!(api("turnstile_accept_batch_orders_count", &[]), 6.0);
    assert_eq!(api("turnstile_accept_batch_duration_seconds_count", &[]), 6.0);
    assert!(api("turnstile_accept_batch_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(api("turnstile_purchase_publishes_total", &[("outcome", "confirmed")]), 6.0);
    assert_eq!(api_after.value("turnstile_long_polls_waiting", &[]), 0.0);
    assert_eq!(api_after.value("turnstile_build_info", &[("service", "api")]), 1.0);
    assert!(api_after.value("db_client_connections_max", &[]) >= 1.0);

    // The worker: messages, batches and decisions, by outcome.
    let worker_after = Exposition::scrape_until(&worker_metrics, "six decisions", |now| {
        delta(&worker_before, now, "turnstile_order_decision_latency_seconds_count", &[]) >= 6.0
    })
    .await;
    let decided =
        |labels: &[(&str, &str)]| delta(&worker_before, &worker_after, "turnstile_orders_decided_total", labels);
    assert_eq!(decided(&[("status", "PENDING"), ("reason", "NONE")]), 3.0);
    assert_eq!(decided(&[("status", "REJECTED"), ("reason", "SOLD_OUT")]), 3.0);
    assert_eq!(decided(&[]), 6.0);
    let worker_delta = |name: &str| delta(&worker_before, &worker_after, name, &[]);
    assert_eq!(worker_delta("turnstile_order_decision_latency_seconds_count"), 6.0);
    assert_eq!(worker_delta("turnstile_purchase_messages_consumed_total"), 6.0);
    assert_eq!(worker_delta("turnstile_allocation_batch_orders_sum"), 6.0);
    assert_eq!(worker_after.value("turnstile_partitions_subscribed", &[]), 8.0);
    assert_eq!(worker_after.value("turnstile_partitions", &[]), 8.0);
    assert_eq!(worker_after.value("turnstile_build_info", &[("service", "worker")]), 1.0);
    // Every status change relayed: 6 QUEUED, then 3 PENDING and 3 REJECTED.
    let relayed = Exposition::scrape_until(&worker_metrics, "twelve order events relayed", |now| {
        delta(&worker_before, now, "turnstile_order_events_published_total", &[]) >= 12.0
    })
    .await;
    assert_eq!(delta(&worker_before, &relayed, "turnstile_order_events_published_total", &[]), 12.0);
    assert!(relayed.has("turnstile_relay_lag_seconds"));

    // Both expositions pass Prometheus's own checks, and the README documents every metric.
    api_after.check_with_promtool();
    relayed.check_with_promtool();
    let documented = documented_metrics();
    for exposition in [&api_after, &relayed] {
        for line in exposition.text.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').expect("# TYPE name kind");
            assert_eq!(documented.get(name).map(String::as_str), Some(kind), "README's Observability table: {name}");
        }
    }
}

/// Promo code uses counted by outcome: taken, or refused for the code's limit.
#[tokio::test]
async fn the_worker_counts_promo_code_uses_by_outcome() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let worker = app.spawn_worker(&[]);
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let created = app
        .post(&format!("/api/v1/events/{event}/promo-codes"), &json!({"code": "THREE", "max_uses": 3}), Some(&admin))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let buyers = app.buyers(3).await;
    let before = Exposition::scrape(&worker.metrics_base()).await;
    // 2 taken, then 2 refused (1 left), then 1 taken; one after another.
    for ((_, token), (quantity, status)) in buyers.iter().zip([(2, "PENDING"), (2, "REJECTED"), (1, "PENDING")]) {
        let body = json!({"event_id": event, "quantity": quantity, "promo_code": "three"});
        let placed = app.post("/api/v1/orders", &body, Some(token)).await;
        assert_eq!(placed.status, 202, "{}", placed.body);
        let order: Uuid = placed.json["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(app.outcome(token, order).await["status"], status);
    }
    let after = Exposition::scrape_until(&worker.metrics_base(), "three uses taken", |now| {
        delta(&before, now, "turnstile_promo_code_uses_total", &[("outcome", "taken")]) >= 3.0
    })
    .await;
    let uses = |outcome| delta(&before, &after, "turnstile_promo_code_uses_total", &[("outcome", outcome)]);
    assert_eq!((uses("taken"), uses("used_up"), uses("buyer_limit")), (3.0, 2.0, 0.0));
    let decided = |reason| delta(&before, &after, "turnstile_orders_decided_total", &[("reason", reason)]);
    assert_eq!(decided("PROMO_CODE_USED_UP"), 1.0);
    let documented = documented_metrics();
    assert_eq!(documented.get("turnstile_promo_code_uses_total").map(String::as_str), Some("counter"));
}

/// The metrics the README's Observability table lists, with their types.
fn documented_metrics() -> std::collections::HashMap<String, String> {
    let readme = std::fs::read_to_string(tests::workspace_root().join("README.md")).expect("README.md");
    readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix("| `")?.split(" | ");
            let name = cells.next()?.strip_suffix('`')?;
            let kind = cells.next()?;
            ["counter", "gauge", "histogram"].contains(&kind).then(|| (name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// The dashboard and the alert rules use only metrics that exist (the README's table, which
/// the test above holds to the real expositions), and the rules and the Prometheus
/// configuration pass `promtool`.
#[test]
fn the_dashboard_and_the_alerts_use_documented_metrics() {
    let root = tests::workspace_root();
    let documented = documented_metrics();
    assert!(documented.len() >= 25, "{documented:?}");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/turnstile.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).expect("alerts");
    queries.push(alerts);
    for query in &queries {
        let names = query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| ["turnstile_", "http_server_", "db_client_"].iter().any(|p| word.starts_with(p)));
        for name in names {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            let known = documented.contains_key(name) || documented.get(base).is_some_and(|k| k == "histogram");
            assert!(known, "{name} (in {query:?}) is not a documented metric");
        }
    }
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    for args in
        [["check", "rules", "deploy/prometheus/alerts.yml"], ["check", "config", "deploy/prometheus/prometheus.yml"]]
    {
        let out = std::process::Command::new(&promtool).args(args).current_dir(&root).output().expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A local webhook receiver that answers 204 to everything.
async fn receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(|| async { StatusCode::NO_CONTENT });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hooks")
}

/// The trace id the api logged for the request that created `order` (its response line,
/// which may reach the log a moment after the response reached the client).
async fn api_trace_of(app: &TestApp, order: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = app
            .api_logs()
            .into_iter()
            .find(|line| line["message"] == "finished processing request" && line["span"]["order_id"] == order);
        if let Some(line) = found {
            return line["span"]["trace_id"].as_str().expect("the request span has a trace id").to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no api log line names order {order}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_orders_trace_id_links_its_api_and_worker_log_lines() {
    let app = TestApp::spawn_process().await;
    let worker = app.spawn_worker(&[]);
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 10).await;
    let (_, buyer) = app.buyers(1).await.pop().expect("a buyer");
    let hook = app.post("/api/v1/webhook-endpoints", &json!({"url": receiver().await}), Some(&buyer)).await;
    assert_eq!(hook.status, 201, "{}", hook.body);

    // Without a trace of its own, the request starts one.
    let order = app.order(&buyer, event, 1, None).await;
    assert_eq!(order.status, 202);
    let order_id = order.json["id"].as_str().expect("id").to_owned();
    let trace = api_trace_of(&app, &order_id).await;
    assert_eq!(trace.len(), 32, "{trace}");
    let decided = worker
        .wait_for_log("order decided", Duration::from_secs(20), |line| line["order_id"] == order_id.as_str())
        .await;
    assert_eq!(decided["trace_id"], trace.as_str(), "the worker's decision continues the api's trace");
    assert_eq!(decided["status"], "PENDING");
    // Its webhook deliveries (order.queued, order.pending) continue it too: one attempt each.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempts = worker.logs("webhook attempt");
        let traced: Vec<&Value> = attempts.iter().filter(|line| line["span"]["trace_id"] == trace.as_str()).collect();
        if traced.len() == 2 {
            assert!(traced.iter().all(|line| line["status"] == "SUCCEEDED"), "{traced:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "deliveries of the order's trace: {attempts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A client's W3C traceparent is continued: its trace id runs through api and worker.
    let client_trace = Uuid::new_v4().simple().to_string();
    let response = app
        .client
        .post(app.url("/api/v1/orders"))
        .bearer_auth(&buyer)
        .header("traceparent", format!("00-{client_trace}-00f067aa0ba902b7-01"))
        .json(&json!({"event_id": event, "quantity": 1}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("json");
    let traced_order = body["id"].as_str().expect("id").to_owned();
    assert_eq!(api_trace_of(&app, &traced_order).await, client_trace);
    let decided = worker
        .wait_for_log("order decided", Duration::from_secs(20), |line| line["order_id"] == traced_order.as_str())
        .await;
    assert_eq!(decided["trace_id"], client_trace.as_str());
    // The stored order keeps the trace (what re-publishes and deliveries continue).
    let stored: Option<String> = sqlx::query_scalar("SELECT traceparent FROM orders WHERE id = $1::uuid")
        .bind(&traced_order)
        .fetch_one(&app.db.pool)
        .await
        .expect("order row");
    assert!(stored.is_some_and(|t| t.contains(&client_trace)));
}

#[tokio::test]
async fn metrics_and_worker_probes_stay_off_the_public_api() {
    let app = TestApp::spawn_process().await;
    let worker = app.spawn_worker(&[]);
    // The public address has no /metrics; METRICS_ADDR has.
    app.get("/metrics", None).await.assert_error(404, "not_found");
    Exposition::scrape(&app.api_metrics_base()).await;

    let base = worker.metrics_base();
    let live: Value = reqwest::get(format!("{base}/health/live")).await.expect("live").json().await.expect("json");
    assert_eq!(live["status"], "ok");
    let ready = reqwest::get(format!("{base}/health/ready")).await.expect("ready");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["database"], "ok");
    assert_eq!(ready["checks"]["partitions_subscribed"], 8);
    assert_eq!((&ready["checks"]["tasks"], &ready["checks"]["stopped_task"]), (&json!("ok"), &Value::Null));

    // A second worker told to serve on a taken address refuses to start, and says why.
    let taken = base.trim_start_matches("http://").to_owned();
    let envs =
        [("DATABASE_URL", app.db.url.clone()), ("AMQP_URL", app.broker.url.clone()), ("METRICS_ADDR", taken.clone())];
    let (ok, _, stderr) = tests::run("worker", &[], &envs, None);
    assert!(!ok, "a worker started on a taken METRICS_ADDR");
    assert!(stderr.contains(&format!("binding METRICS_ADDR {taken}")), "{stderr}");
}

/// An OTLP/HTTP collector on a loopback port: records the body of every export request.
async fn collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap_or_else(|e| e.into_inner()).push(body.to_vec());
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), bodies)
}

#[tokio::test]
async fn traces_are_exported_over_otlp_when_a_collector_is_configured() {
    let (endpoint, bodies) = collector().await;
    // The spans' own modules log nothing: traces do not depend on the log level.
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ("RUST_LOG", "warn,api=info,worker=info,api::routes=warn,worker::allocate=warn".to_owned()),
    ];
    let app = TestApp::spawn_process_with(&otlp).await;
    let _worker = app.spawn_worker(&otlp);
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 10).await;
    let (_, buyer) = app.buyers(1).await.pop().expect("a buyer");
    let trace = Uuid::new_v4();
    let response = app
        .client
        .post(app.url("/api/v1/orders"))
        .bearer_auth(&buyer)
        .header("traceparent", format!("00-{}-00f067aa0ba902b7-01", trace.simple()))
        .json(&json!({"event_id": event, "quantity": 1}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 202);

    // The exports (protobuf) of each service name that trace: the api's request span is in
    // it, the worker's batch span links to it. Its 16 bytes appear as they are.
    let contains = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = bodies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let exported_by = |service: &str| {
            seen.iter().any(|body| contains(body, service.as_bytes()) && contains(body, trace.as_bytes()))
        };
        if exported_by("turnstile-api") && exported_by("turnstile-worker") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the trace was not exported by both ({} exports)", seen.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
