//! Attacks that must get nowhere, over HTTP against the real api: password guessing,
//! SQL-looking input, and secrets or password hashes leaking into responses or logs.
//! (Forged tokens: accounts.rs; other users' resources: orders.rs, payments.rs, tickets.rs,
//! webhooks.rs; forged and replayed payment webhooks: payments.rs; oversized bodies:
//! operations.rs.)

use serde_json::json;
use tests::{JWT_SECRET, PASSWORD, TICKET_SECRET, TestApp, WEBHOOK_SECRET};

#[tokio::test]
async fn password_guessing_is_throttled_per_account() {
    let app = TestApp::spawn_with(&[("LOGIN_ATTEMPTS_PER_MINUTE", "3".to_owned())]).await;
    let (_, email) = app.signup("ada").await;
    let (_, other) = app.signup("grace").await;
    for _ in 0..3 {
        app.login(&email, "a wrong guess").await.assert_error(401, "unauthorized");
    }
    // Over the limit: refused before the password is even looked at, the right one too.
    for password in ["another guess", PASSWORD] {
        let res = app.login(&email, password).await;
        res.assert_error(429, "too_many_requests");
        let wait: u64 = res.header("retry-after").expect("Retry-After").parse().expect("seconds");
        assert!((1..=20).contains(&wait), "one attempt comes back every 20 s: {wait}");
    }
    // However the address is written.
    app.login(&email.to_uppercase(), PASSWORD).await.assert_error(429, "too_many_requests");
    // Other accounts are not affected.
    assert_eq!(app.login(&other, PASSWORD).await.status, 200);
}

#[tokio::test]
async fn sign_ups_are_throttled_per_client_address() {
    let app = TestApp::spawn_with(&[("SIGNUP_PER_MINUTE", "2".to_owned())]).await;
    app.signup("ada").await;
    app.signup("grace").await;
    let body = json!({"name": "Mallory", "email": "mallory@example.com", "password": PASSWORD});
    let res = app.post("/api/v1/signup", &body, None).await;
    res.assert_error(429, "too_many_requests");
    assert!(res.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=30).contains(&s))));
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(users, 2, "the refused sign-up created nothing");
}

#[tokio::test]
async fn sql_looking_input_is_stored_verbatim() {
    let app = TestApp::spawn().await;
    let name = "Robert'); DROP TABLE users; --";
    let email = "bobby@example.com";
    let res = app.post("/api/v1/signup", &json!({"name": name, "email": email, "password": PASSWORD}), None).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.json["name"], name);
    let token = app.token_for(email).await;
    assert_eq!(app.get("/api/v1/me", Some(&token)).await.json["name"], name);

    let admin = app.admin().await;
    let location = "' OR '1'='1";
    let event = app.create_event(&admin, json!({"name": "x\"; SELECT pg_sleep(10); --", "location": location})).await;
    assert_eq!(event.status, 201, "{}", event.body);
    let read = app.get(&format!("/api/v1/events/{}", event.json["id"].as_str().unwrap()), None).await;
    assert_eq!(read.json["name"], "x\"; SELECT pg_sleep(10); --");
    assert_eq!(read.json["location"], location);
    // A path segment that looks like SQL names nothing.
    app.get("/api/v1/events/1%20OR%201=1", None).await.assert_error(404, "not_found");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(users, 2, "the users table is intact");
}

#[tokio::test]
async fn secrets_and_password_hashes_never_leave_the_api() {
    let app = TestApp::spawn().await;
    let (email, password) = ("ada@example.com", "a password of this test only");
    let res = app.post("/api/v1/signup", &json!({"name": "Ada", "email": email, "password": password}), None).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let res = app.login(email, password).await;
    let token = res.json["access_token"].as_str().expect("token").to_owned();
    let admin = app.admin().await;
    let mut bodies = vec![
        res.body.replace(&token, "<the token>"),
        app.login(email, "a wrong guess").await.body,
        app.get("/api/v1/me", Some(&token)).await.body,
        app.get("/api/v1/users", Some(&admin)).await.body,
        app.get("/api/v1/me", Some("not-a-token")).await.body,
        app.post("/api/v1/orders", &json!({"event_id": "nope", "quantity": 1}), Some(&token)).await.body,
        app.get("/api/v1/openapi.json", None).await.body,
    ];
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE email = $1")
        .bind(email)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    // The test's other passwords: the admin's (`PASSWORD`) is the API document's example.
    let api_document = bodies.pop().expect("the API document");
    for secret in [password, JWT_SECRET, WEBHOOK_SECRET, TICKET_SECRET, &hash, &token, &admin] {
        assert!(!api_document.contains(secret), "the API document contains {secret:?}");
    }
    bodies.push(serde_json::to_string(&app.api_logs()).unwrap());
    for (i, text) in bodies.iter().enumerate() {
        for secret in [password, PASSWORD, JWT_SECRET, WEBHOOK_SECRET, TICKET_SECRET, &hash, "$argon2", &token, &admin]
        {
            assert!(!text.contains(secret), "text {i} (the last is the api's log) contains {secret:?}");
        }
    }
}
