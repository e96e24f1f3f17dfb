//! What operators and clients rely on around the routes: configuration checks at start-up,
//! health probes, the OpenAPI document, error shapes for unknown routes and big bodies,
//! request ids, and the `migrate` subcommand.

use std::time::Duration;

use serde_json::json;
use tests::{Services, TestApp, TestDb, worker_decides};

#[tokio::test]
async fn api_refuses_to_start_without_valid_secrets() {
    let services = Services::from_env();
    let base = vec![
        ("DATABASE_URL", services.database_url.clone()),
        ("AMQP_URL", services.amqp_url.clone()),
        ("BIND_ADDR", "127.0.0.1:0".to_owned()),
    ];
    let strong = "s".repeat(32);

    let (ok, _, stderr) = tests::run("api", &["serve"], &base, None);
    assert!(!ok, "started without secrets");
    assert!(
        stderr.contains("--jwt-secret") && stderr.contains("--webhook-secret") && stderr.contains("--ticket-secret"),
        "{stderr}"
    );

    let mut base = base;
    base.push(("TICKET_SECRET", strong.clone()));
    let mut short = base.clone();
    short.push(("JWT_SECRET", "too-short-secret".to_owned()));
    short.push(("WEBHOOK_SECRET", strong.clone()));
    let (ok, _, stderr) = tests::run("api", &["serve"], &short, None);
    assert!(!ok, "started with a short JWT secret");
    assert!(stderr.contains("JWT_SECRET must be at least 32 bytes"), "{stderr}");
    assert!(!stderr.contains("too-short-secret"), "the secret was echoed: {stderr}");

    let mut short_webhook = base.clone();
    short_webhook.push(("JWT_SECRET", strong.clone()));
    short_webhook.push(("WEBHOOK_SECRET", "whsec_c2hvcnQ=".to_owned()));
    let (ok, _, stderr) = tests::run("api", &["serve"], &short_webhook, None);
    assert!(!ok);
    assert!(stderr.contains("WEBHOOK_SECRET must be at least 32 bytes"), "{stderr}");

    let mut short_ticket: Vec<_> = base.iter().filter(|(name, _)| *name != "TICKET_SECRET").cloned().collect();
    short_ticket.push(("JWT_SECRET", strong.clone()));
    short_ticket.push(("WEBHOOK_SECRET", strong.clone()));
    short_ticket.push(("TICKET_SECRET", "short-ticket-secret".to_owned()));
    let (ok, _, stderr) = tests::run("api", &["serve"], &short_ticket, None);
    assert!(!ok);
    assert!(stderr.contains("TICKET_SECRET must be at least 32 bytes"), "{stderr}");
}

#[tokio::test]
async fn health_probes_report_dependencies() {
    let app = TestApp::spawn_process().await;
    let live = app.get("/health/live", None).await;
    assert_eq!((live.status, live.json["status"].as_str()), (200, Some("ok")));
    let ready = app.get("/health/ready", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json, json!({"status": "ready", "checks": {"database": "ok", "broker": "ok", "tasks": "ok"}}));
}

#[tokio::test]
async fn readiness_fails_when_the_broker_is_unreachable() {
    // An AMQP URL nobody listens on: the api still starts (and serves what needs no broker),
    // but says it is not ready.
    let app = TestApp::spawn_process_with(&[("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f".to_owned())]).await;
    let ready = app.get("/health/ready", None).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json["checks"], json!({"database": "ok", "broker": "unavailable", "tasks": "ok"}));
    assert_eq!(app.get("/health/live", None).await.status, 200);
}

/// `AMQP_URL` may list several brokers (a cluster's nodes), comma-separated: api and worker
/// connect to the first that answers, so a node that is down is skipped, for publishing,
/// consuming and the order events relay alike; its credentials never reach the logs.
#[tokio::test]
async fn several_broker_addresses_are_tried_in_turn() {
    let app = TestApp::spawn_process_with(&worker_decides()).await;
    let both = format!("amqp://guest:not-logged@127.0.0.1:9/%2f, {}", app.broker.url);
    let (api, base) = app.spawn_another_api_with(&[("AMQP_URL", both.clone())]);
    let _worker = app.spawn_worker(&[("AMQP_URL", both)]);

    let ready = app.client.get(format!("{base}/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready through the live address");
    let admin = app.admin().await;
    let event = app.event_with(&admin, 5, 4).await;
    let (_, buyer) = app.user("Buyer").await;
    let body = json!({"event_id": event, "quantity": 2});
    let res = app.client.post(format!("{base}/api/v1/orders")).bearer_auth(&buyer).json(&body).send().await.unwrap();
    let order = tests::Response::from(res).await;
    assert_eq!(order.status, 202, "{}", order.body);
    let id = order.json["id"].as_str().unwrap();
    let polled = app.get(&format!("/api/v1/orders/{id}?wait=20&status=QUEUED"), Some(&buyer)).await;
    assert_eq!(polled.json["status"], "PENDING", "published and consumed through the live address: {}", polled.body);

    let logs = api.all_logs();
    assert!(
        logs.iter()
            .any(|l| l["message"] == "broker address unreachable; trying the next" && l["broker"] == "127.0.0.1:9"),
        "the dead address was tried and named without its credentials"
    );
    assert!(!logs.iter().any(|l| l.to_string().contains("not-logged")), "credentials in the logs");
}

#[tokio::test]
async fn openapi_document_and_swagger_ui_are_served() {
    let app = TestApp::spawn_process().await;
    let doc = app.get("/api/v1/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    assert!(doc.json["openapi"].as_str().unwrap().starts_with("3."));
    for path in
        ["/api/v1/signup", "/api/v1/login", "/api/v1/me", "/api/v1/me/events", "/api/v1/me/tickets", "/api/v1/events"]
    {
        assert!(doc.json["paths"].get(path).is_some(), "missing {path}");
    }
    assert!(doc.json["components"]["securitySchemes"]["bearer"].is_object());
    // The image upload is a form with a file field, so Swagger UI offers a file picker.
    let upload =
        &doc.json["paths"]["/api/v1/events/{id}/image"]["put"]["requestBody"]["content"]["multipart/form-data"];
    assert_eq!(upload["schema"]["properties"]["image"]["format"], "binary", "{upload}");
    assert_eq!(upload["schema"]["required"], json!(["image"]));
    let ui = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(ui.status(), 200);
    assert!(ui.text().await.unwrap().contains("swagger"), "Swagger UI page");
    // The Go API's documented address leads there too.
    for old in ["/api/v1/swagger", "/api/v1/swagger/", "/api/v1/swagger/index.html"] {
        let res = app.client.get(app.url(old)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{old}");
        assert_eq!(res.url().path(), "/docs/", "{old}");
        assert!(res.text().await.unwrap().contains("swagger"), "{old}: Swagger UI page");
    }
}

#[tokio::test]
async fn unknown_routes_methods_and_oversized_bodies_get_json_errors() {
    let app = TestApp::spawn_process_with(&[("BODY_LIMIT_BYTES", "2048".to_owned())]).await;
    app.get("/api/v1/nothing-here", None).await.assert_error(404, "not_found");
    let res = tests::Response::from(app.client.delete(app.url("/api/v1/signup")).send().await.unwrap()).await;
    res.assert_error(405, "method_not_allowed");

    let big = json!({"name": "x".repeat(4096), "email": "big@example.com", "password": "correct horse battery"});
    app.post("/api/v1/signup", &big, None).await.assert_error(413, "payload_too_large");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn request_ids_are_generated_or_echoed() {
    let app = TestApp::spawn_process().await;
    let generated = app.get("/health/live", None).await;
    let id = generated.header("x-request-id").expect("x-request-id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let echoed = app.client.get(app.url("/health/live")).header("x-request-id", "trace-me-123").send().await.unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-me-123");
}

#[tokio::test]
async fn migrate_subcommand_builds_the_schema_and_is_idempotent() {
    let services = Services::from_env();
    let db = TestDb::empty(&services).await;
    for _ in 0..2 {
        let (ok, stdout, stderr) = tests::run("api", &["migrate"], &[("DATABASE_URL", db.url.clone())], None);
        assert!(ok, "{stdout} {stderr}");
        assert!(stdout.contains("migrations applied"));
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for table in ["events", "orders", "tickets", "users"] {
        assert!(tables.iter().any(|t| t == table), "{tables:?}");
    }
    // The oversell guard is in the schema itself.
    let err = sqlx::query(
        "INSERT INTO events (id, name, location, organization, starts_at, capacity, sold, price)
         VALUES ($1, 'x', 'y', 'z', now() + interval '1 day', 5, 6, 1)",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("events_sold_within_capacity"), "{err}");
}

#[tokio::test]
async fn api_shuts_down_gracefully_on_sigterm() {
    let mut app = TestApp::spawn_process().await;
    assert_eq!(app.get("/health/live", None).await.status, 200);
    // Covered in detail by the process helper; here: SIGTERM ends the process with success.
    let status = app.terminate_api();
    assert!(status.is_some_and(|s| s.success()), "exit status after SIGTERM: {status:?}");
}

/// `CORS_ALLOWED_ORIGINS`: a storefront on a listed origin may call the API from the
/// browser (preflight answered, its origin echoed, the useful headers exposed); any other
/// origin gets no CORS headers; without the setting there are none at all; a value that is
/// not an origin stops the api at start.
#[tokio::test]
async fn cors_is_off_by_default_and_opens_to_listed_origins_only() {
    let shop = "https://shop.example.com";
    let preflight = |app: &TestApp, origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type, idempotency-key")
            .send()
    };
    let app = TestApp::spawn_process_with(&[("CORS_ALLOWED_ORIGINS", format!("{shop},http://localhost:5173"))]).await;
    let res = preflight(&app, shop).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], shop);
    let allowed = res.headers()["access-control-allow-headers"].to_str().unwrap().to_owned();
    assert!(allowed.contains("authorization") && allowed.contains("idempotency-key"), "{allowed}");
    let get = app.client.get(app.url("/api/v1/events")).header("origin", shop).send().await.unwrap();
    assert_eq!(get.headers()["access-control-allow-origin"], shop);
    let exposed = get.headers()["access-control-expose-headers"].to_str().unwrap().to_owned();
    assert!(exposed.contains("location") && exposed.contains("x-request-id"), "{exposed}");
    let other = preflight(&app, "https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none(), "another origin was allowed");

    let closed = TestApp::spawn_process().await;
    let get = closed.client.get(closed.url("/api/v1/events")).header("origin", shop).send().await.unwrap();
    assert!(get.headers().get("access-control-allow-origin").is_none(), "CORS is on without the setting");

    let services = Services::from_env();
    let strong = "s".repeat(32);
    // A path, and (issue 29) a wildcard pattern that no browser origin matches.
    for origin in ["https://shop.example.com/checkout", "http://*.example.com"] {
        let env = vec![
            ("DATABASE_URL", services.database_url.clone()),
            ("AMQP_URL", services.amqp_url.clone()),
            ("BIND_ADDR", "127.0.0.1:0".to_owned()),
            ("JWT_SECRET", strong.clone()),
            ("WEBHOOK_SECRET", strong.clone()),
            ("TICKET_SECRET", strong.clone()),
            ("CORS_ALLOWED_ORIGINS", origin.to_owned()),
        ];
        let (ok, _, stderr) = tests::run("api", &["serve"], &env, None);
        assert!(!ok, "started with {origin} for an origin");
        assert!(stderr.contains("CORS_ALLOWED_ORIGINS"), "{stderr}");
    }
}

/// `worker health` (docker-compose's health check of the worker): 0 while a worker on this
/// host heartbeats, 1 for a host without one, and 1 again once that worker has stopped.
#[tokio::test]
async fn worker_health_follows_its_heartbeat() {
    let app = TestApp::spawn_process().await;
    let host = format!("worker-host-{}", uuid::Uuid::new_v4().simple());
    let mut worker = app.spawn_worker(&[("HOSTNAME", host.clone())]);
    let check = |hostname: &str| {
        tests::run(
            "worker",
            &["health"],
            &[
                ("DATABASE_URL", app.db.url.clone()),
                ("AMQP_URL", app.broker.url.clone()),
                ("HEARTBEAT_MS", "200".to_owned()),
                ("HOSTNAME", hostname.to_owned()),
            ],
            None,
        )
    };
    let (ok, _, stderr) = check(&host);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = check("some-other-host");
    assert!(!ok && stderr.contains("no worker on host"), "{stderr}");
    worker.terminate();
    let (ok, _, stderr) = check(&host);
    assert!(!ok, "a stopped worker is not healthy: {stderr}");
}

/// Background tasks are supervised. When the database goes away for good (dropped: every
/// reconnection is refused with SQLSTATE `3D000`), the worker's loops and the api's
/// notification listener stop instead of retrying for ever, and each process logs the task
/// that stopped and why, and exits non-zero, for its orchestrator to restart it.
#[tokio::test]
async fn a_task_whose_database_is_gone_stops_its_process_naming_the_task() {
    let mut app = TestApp::spawn_process().await;
    let mut worker = app.spawn_worker(&[]);
    app.db.drop_now().await;

    let stopped = |logs: Vec<serde_json::Value>| {
        logs.into_iter().find(|line| line["message"] == "a task stopped; stopping the process")
    };
    let status = worker.wait_for_exit(Duration::from_secs(60)).await.expect("the worker exits by itself");
    assert!(!status.success(), "the worker's exit status says it failed: {status}");
    let line = stopped(worker.all_logs()).expect("the worker logs the task that stopped");
    assert!(line["task"].as_str().is_some_and(|task| !task.is_empty()), "{line}");
    assert!(line["error"].as_str().unwrap_or_default().contains("does not exist"), "{line}");

    let status = app.wait_for_api_exit(Duration::from_secs(60)).await.expect("the api exits by itself");
    assert!(!status.success(), "the api's exit status says it failed: {status}");
    let line = stopped(app.api_logs()).expect("the api logs the task that stopped");
    assert_eq!(line["task"], "notification listener", "{line}");
    assert!(line["error"].as_str().unwrap_or_default().contains("does not exist"), "{line}");
}
