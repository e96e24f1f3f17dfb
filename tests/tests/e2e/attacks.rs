//! Attacks that must get nowhere, over HTTP against the real api: password guessing,
//! SQL-looking input, secrets or password hashes leaking into responses or logs, and the
//! findings of the security review (issue 15), each reproduced: memory exhaustion through
//! log-ins, tokens outliving a demotion or a password change, control characters, tokens of
//! deleted accounts, racing the endpoint limit, inexact money, images that are not images,
//! missing security headers. (Forged tokens: accounts.rs; other users' resources:
//! orders.rs, payments.rs, tickets.rs, webhooks.rs; forged and replayed payment webhooks:
//! payments.rs; oversized bodies: operations.rs; webhook targets behind a proxy and in
//! IPv6 disguise: webhooks.rs.)

use serde_json::json;
use tests::{JWT_SECRET, PASSWORD, TICKET_SECRET, TestApp, WEBHOOK_SECRET};
use uuid::Uuid;

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

/// Several api processes behind a load balancer share the limits (they live in
/// PostgreSQL): guesses spread over two processes get no more than one process allows.
#[tokio::test]
async fn throttles_hold_across_api_processes() {
    let app =
        TestApp::spawn_with(&[("LOGIN_ATTEMPTS_PER_MINUTE", "4".to_owned()), ("SIGNUP_PER_MINUTE", "3".to_owned())])
            .await;
    let (_other_api, other_base) = app.spawn_another_api();
    let (_, email) = app.signup("ada").await;
    let login = |base: String, email: String| {
        let app = &app;
        async move {
            let res = app
                .client
                .post(format!("{base}/api/v1/login"))
                .json(&json!({"email": email, "password": "a wrong guess"}))
                .send()
                .await
                .expect("log-in sent");
            tests::Response::from(res).await
        }
    };
    // Eight guesses at once, half on each process: exactly four are looked at.
    let guesses = (0..8).map(|i| login(if i % 2 == 0 { app.base.clone() } else { other_base.clone() }, email.clone()));
    let answers: Vec<u16> = futures_util::future::join_all(guesses).await.iter().map(|res| res.status).collect();
    assert_eq!(answers.iter().filter(|s| **s == 401).count(), 4, "{answers:?}");
    assert_eq!(answers.iter().filter(|s| **s == 429).count(), 4, "{answers:?}");
    for base in [app.base.clone(), other_base.clone()] {
        login(base, email.clone()).await.assert_error(429, "too_many_requests");
    }
    // Sign-ups from one address: two more on the other process reach the limit of three.
    let signup = |base: String, name: &'static str| {
        let app = &app;
        async move {
            let body = json!({"name": name, "email": format!("{name}@example.com"), "password": PASSWORD});
            let res = app.client.post(format!("{base}/api/v1/signup")).json(&body).send().await.expect("sent");
            tests::Response::from(res).await
        }
    };
    assert_eq!(signup(other_base.clone(), "grace").await.status, 201);
    assert_eq!(signup(other_base.clone(), "linus").await.status, 201);
    signup(app.base.clone(), "mallory").await.assert_error(429, "too_many_requests");
    signup(other_base.clone(), "trudy").await.assert_error(429, "too_many_requests");
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
    let app = TestApp::spawn_process().await;
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

/// The peak resident memory of a process (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM line");
    kib / 1024
}

/// Finding 1 (high): every log-in runs argon2id with 19 MiB of memory; unbounded, a few
/// hundred concurrent log-ins with made-up emails (each a fresh account allowance) took the
/// api to gigabytes. Hashes now run a few at a time; the rest wait briefly, then get 503.
#[tokio::test]
async fn concurrent_log_ins_cannot_exhaust_memory() {
    // The per-address limit is raised so that every request reaches the hasher.
    let app = TestApp::spawn_process_with(&[("LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE", "100000".to_owned())]).await;
    let before = peak_rss_mib(app.api_pid());
    let attempts = (0..400).map(|i| {
        let app = &app;
        async move { app.login(&format!("nobody-{i}-{}@example.com", Uuid::new_v4().simple()), "a guess").await }
    });
    let answers = futures_util::future::join_all(attempts).await;
    let (mut refused, mut busy) = (0, 0);
    for res in &answers {
        match res.status {
            401 => refused += 1,
            503 => {
                res.assert_error(503, "busy");
                assert_eq!(res.header("retry-after"), Some("1"), "{}", res.body);
                busy += 1;
            }
            _ => panic!("a log-in answered {}: {}", res.status, res.body),
        }
    }
    assert_eq!(refused + busy, 400);
    assert!(refused >= 2, "some log-ins were hashed and refused: {refused}");
    let peak = peak_rss_mib(app.api_pid());
    eprintln!(
        "api peak RSS: {before} MiB before, {peak} MiB after 400 concurrent log-ins ({refused} hashed, {busy} busy)"
    );
    assert!(peak < 160, "the api's peak memory was {peak} MiB (before the log-ins: {before} MiB)");
}

/// Finding 1: besides the per-account limit, log-ins are limited per client address, so
/// made-up emails do not each get a fresh allowance.
#[tokio::test]
async fn log_ins_are_throttled_per_client_address() {
    let app = TestApp::spawn_with(&[("LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE", "4".to_owned())]).await;
    let (_, email) = app.signup("ada").await;
    for i in 0..4 {
        app.login(&format!("nobody-{i}@example.com"), "a guess").await.assert_error(401, "unauthorized");
    }
    // The fifth attempt from this address is refused, whatever account it names.
    for (email, password) in [("nobody-4@example.com", "a guess"), (email.as_str(), PASSWORD)] {
        let res = app.login(email, password).await;
        res.assert_error(429, "too_many_requests");
        assert!(res.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=15).contains(&s))));
    }
}

/// Finding 3: a demoted admin's token passed admin routes until it expired (and could
/// promote itself back); a password change left every earlier token valid. Both now revoke
/// the account's tokens at once, in this api process and, through PostgreSQL's NOTIFY, in
/// every other one.
#[tokio::test]
async fn demotion_and_password_change_revoke_earlier_tokens() {
    let app = TestApp::spawn().await;
    let (_other_api, other_base) = app.spawn_another_api();
    let admin = app.admin().await;
    let (bob, bob_email) = app.signup("bob").await;
    let bob_user_token = app.token_for(&bob_email).await;
    let promote = |role: &'static str| {
        let app = &app;
        let admin = admin.clone();
        async move { app.patch(&format!("/api/v1/users/{bob}/role"), &json!({"role": role}), Some(&admin)).await }
    };
    assert_eq!(promote("admin").await.status, 200);
    // A role change revokes the tokens issued before it (they carry the old role).
    app.get("/api/v1/me", Some(&bob_user_token)).await.assert_error(401, "unauthorized");
    let bob_admin_token = app.token_for(&bob_email).await;
    assert_eq!(app.get("/api/v1/users", Some(&bob_admin_token)).await.status, 200);
    let other_api =
        |path: &str, token: &str| app.client.get(format!("{other_base}{path}")).bearer_auth(token.to_owned()).send();
    assert_eq!(other_api("/api/v1/users", &bob_admin_token).await.unwrap().status(), 200);

    assert_eq!(promote("user").await.status, 200);
    let res = app.get("/api/v1/users", Some(&bob_admin_token)).await;
    res.assert_error(401, "unauthorized");
    assert!(res.json["error"]["message"].as_str().unwrap().contains("log in again"), "{}", res.body);
    let regain =
        app.patch(&format!("/api/v1/users/{bob}/role"), &json!({"role": "admin"}), Some(&bob_admin_token)).await;
    regain.assert_error(401, "unauthorized");
    // The other api process learns of it from the notification, within moments.
    let status =
        tests::refused_within_a_second(&app.client, &format!("{other_base}/api/v1/users"), &bob_admin_token).await;
    assert_eq!(status, 401, "the other api still took the demoted admin's token");
    let bob_user_token = app.token_for(&bob_email).await;
    app.get("/api/v1/users", Some(&bob_user_token)).await.assert_error(403, "forbidden");

    // A password change: the earlier tokens stop working, the new password works.
    let (_, carol_email) = app.signup("carol").await;
    let stolen = app.token_for(&carol_email).await;
    let kept = app.token_for(&carol_email).await;
    let change = json!({"password": "a brand new password", "current_password": PASSWORD});
    assert_eq!(app.patch("/api/v1/me", &change, Some(&kept)).await.status, 200);
    for token in [&stolen, &kept] {
        app.get("/api/v1/me", Some(token)).await.assert_error(401, "unauthorized");
        // The other process hears of it by notification: within moments, not necessarily
        // before this request.
        let status = tests::refused_within_a_second(&app.client, &format!("{other_base}/api/v1/me"), token).await;
        assert_eq!(status, 401, "the other api still took a token issued before the password change");
    }
    app.login(&carol_email, PASSWORD).await.assert_error(401, "unauthorized");
    let res = app.login(&carol_email, "a brand new password").await;
    let fresh = res.json["access_token"].as_str().expect("token").to_owned();
    assert_eq!(app.get("/api/v1/me", Some(&fresh)).await.status, 200);
    assert_eq!(other_api("/api/v1/me", &fresh).await.unwrap().status(), 200);
    // A name change alone revokes nothing.
    assert_eq!(app.patch("/api/v1/me", &json!({"name": "Carol"}), Some(&fresh)).await.status, 200);
    assert_eq!(app.get("/api/v1/me", Some(&fresh)).await.status, 200);
}

/// Finding 4: `PATCH /me` checked `current_password` without limit for anyone holding a
/// token; the checks now count against the account's log-in allowance.
#[tokio::test]
async fn current_password_guessing_is_throttled_with_log_ins() {
    let app = TestApp::spawn_with(&[("LOGIN_ATTEMPTS_PER_MINUTE", "4".to_owned())]).await;
    let (_, email) = app.signup("ada").await;
    let token = app.token_for(&email).await; // the first attempt of the allowance
    for i in 0..3 {
        let guess = json!({"password": "a new password", "current_password": format!("guess {i}")});
        app.patch("/api/v1/me", &guess, Some(&token)).await.assert_error(403, "invalid_current_password");
    }
    let right = json!({"password": "a new password", "current_password": PASSWORD});
    let res = app.patch("/api/v1/me", &right, Some(&token)).await;
    res.assert_error(429, "too_many_requests");
    assert!(res.header("retry-after").is_some());
    // The allowance is the account's: log-ins are refused too.
    app.login(&email, PASSWORD).await.assert_error(429, "too_many_requests");
    // Nothing changed.
    assert_eq!(app.get("/api/v1/me", Some(&token)).await.status, 200);
}

/// Finding 5: a NUL character in stored text was a 500 (PostgreSQL cannot store it). Every
/// text field now refuses control characters with 422 (descriptions keep line breaks).
#[tokio::test]
async fn control_characters_in_text_are_refused_with_422() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let (_, token) = app.user("ada").await;
    let event = app.event_with(&admin, 10, 4).await;
    for bad in ["nul\u{0}here", "escape \u{1b}[2J", "bell\u{7}"] {
        let signup =
            json!({"name": bad, "email": format!("x{}@example.com", Uuid::new_v4().simple()), "password": PASSWORD});
        app.post("/api/v1/signup", &signup, None).await.assert_error(422, "invalid_name");
        app.patch("/api/v1/me", &json!({"name": bad}), Some(&token)).await.assert_error(422, "invalid_name");
        for field in ["name", "location", "organization", "rating", "description", "image_url"] {
            let value = if field == "image_url" { format!("https://example.com/{bad}") } else { bad.to_owned() };
            let res = app.create_event(&admin, json!({ field: value })).await;
            res.assert_error(422, "validation_failed");
            let res = app.patch(&format!("/api/v1/events/{event}"), &json!({ field: value }), Some(&admin)).await;
            res.assert_error(422, "validation_failed");
        }
        let endpoint = json!({"url": "http://127.0.0.1:9/hooks", "description": bad});
        app.post("/api/v1/webhook-endpoints", &endpoint, Some(&token)).await.assert_error(422, "invalid_description");
    }
    let nul_email = json!({"name": "Ada", "email": "a\u{0}b@example.com", "password": PASSWORD});
    app.post("/api/v1/signup", &nul_email, None).await.assert_error(422, "invalid_email");
    app.login("a\u{0}b@example.com", PASSWORD).await.assert_error(401, "unauthorized");
    let order = app.pending_order(&token, event, 1).await;
    let res = app.payment(order, &json!({"status": "REJECTED", "reason": "card\u{0}declined"})).await;
    res.assert_error(422, "invalid_body");
    // Line breaks and tabs are fine in a description.
    let res = app.create_event(&admin, json!({"description": "Doors at 7.\nShow at 8.\tBring ID."})).await;
    assert_eq!(res.status, 201, "{}", res.body);
}

/// Finding 6: a token whose account no longer exists gave 500 (a foreign-key violation)
/// where it creates something; it is 401, as everywhere else.
#[tokio::test]
async fn tokens_of_deleted_accounts_are_401_everywhere() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (_, buyer) = app.user("ada").await;
    let order = app.pending_order(&buyer, event, 1).await;
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    let code = app.get(&format!("/api/v1/orders/{order}"), Some(&buyer)).await.json["tickets"][0]["code"]
        .as_str()
        .expect("a paid ticket's code")
        .to_owned();
    // Accounts deleted (by an operator) after their tokens were issued.
    let (ghost_admin, ghost_user) = (Uuid::now_v7(), Uuid::now_v7());
    let (ghost_admin, ghost_user) = (tests::mint_token(ghost_admin, "admin"), tests::mint_token(ghost_user, "user"));
    let res = app.create_event(&ghost_admin, json!({})).await;
    res.assert_error(401, "unauthorized");
    app.post("/api/v1/check-ins", &json!({"code": code}), Some(&ghost_admin)).await.assert_error(401, "unauthorized");
    let endpoint = json!({"url": "http://127.0.0.1:9/hooks"});
    app.post("/api/v1/webhook-endpoints", &endpoint, Some(&ghost_user)).await.assert_error(401, "unauthorized");
    app.order(&ghost_user, event, 1, None).await.assert_error(401, "unauthorized");
    app.get("/api/v1/me", Some(&ghost_user)).await.assert_error(401, "unauthorized");
    // The real admin's scan still works: nothing was recorded by the ghost.
    assert_eq!(app.post("/api/v1/check-ins", &json!({"code": code}), Some(&admin)).await.status, 200);
}

/// Finding 7: concurrent registrations went past the 10-endpoint limit (count, then
/// insert); the count and the insert are now one step per account.
#[tokio::test]
async fn the_endpoint_limit_holds_under_concurrency() {
    let app = TestApp::spawn().await;
    let (user, token) = app.user("ada").await;
    let bodies: Vec<_> = (0..25).map(|n| json!({"url": format!("http://127.0.0.1:9/hooks/{n}")})).collect();
    let attempts = bodies.iter().map(|body| app.post("/api/v1/webhook-endpoints", body, Some(&token)));
    let answers = futures_util::future::join_all(attempts).await;
    let created = answers.iter().filter(|res| res.status == 201).count();
    for res in answers.iter().filter(|res| res.status != 201) {
        res.assert_error(422, "too_many_endpoints");
    }
    assert_eq!(created, 10);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 10);
}

/// Finding 7: money is taken exactly as written or refused (no silent rounding, no
/// exponents or `_`), and dates stay within what RFC 3339 can write.
#[tokio::test]
async fn prices_are_exact_and_dates_have_four_digit_years() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let create = |raw_price: &str| {
        let body = format!(
            r#"{{"name": "Exact", "location": "Hall", "organization": "Org", "capacity": 10, "price": {raw_price},
                "date": "{}"}}"#,
            (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339()
        );
        app.client
            .post(app.url("/api/v1/events"))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for refused in [
        r#""1.00000000000000000000000000001""#,
        "19.999999999999999",
        "1.00000000000000000000000000001",
        r#""1_000""#,
        r#""1e2""#,
        "1e2",
        r#""+5""#,
        r#"" 5""#,
    ] {
        let res = tests::Response::from(create(refused).await.unwrap()).await;
        res.assert_error(422, "validation_failed");
        assert!(res.json["error"]["message"].as_str().unwrap().starts_with("price"), "{refused}: {}", res.body);
    }
    for (accepted, stored) in [("49.9", "49.90"), (r#""49.90""#, "49.90"), ("12", "12.00"), (r#""1.100""#, "1.10")] {
        let res = tests::Response::from(create(accepted).await.unwrap()).await;
        assert_eq!(res.status, 201, "{accepted}: {}", res.body);
        assert_eq!(res.json["price"], stored);
    }
    // Through an edit too: a number keeps its exact digits.
    let event = app.event_with(&admin, 10, 4).await;
    let patch = app
        .client
        .patch(app.url(&format!("/api/v1/events/{event}")))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(r#"{"price": 19.999999999999999}"#)
        .send();
    tests::Response::from(patch.await.unwrap()).await.assert_error(422, "validation_failed");
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"price": 25.5}), Some(&admin)).await;
    assert_eq!(res.json["price"], "25.50", "{}", res.body);

    for date in ["+10000-01-01T00:00:00Z", "+275000-01-01T00:00:00Z"] {
        let res = app.create_event(&admin, json!({ "date": date })).await;
        assert_eq!(res.status, 422, "{date}: {}", res.body);
        let res = app.patch(&format!("/api/v1/events/{event}"), &json!({ "date": date }), Some(&admin)).await;
        assert_eq!(res.status, 422, "{date}: {}", res.body);
    }
    let res = app.create_event(&admin, json!({"date": "9999-12-31T23:59:59Z"})).await;
    assert_eq!((res.status, res.json["date"].as_str()), (201, Some("9999-12-31T23:59:59Z")), "{}", res.body);
}

/// Finding 7: an image is decoded whole, within bounds, before it is stored: a PNG
/// signature in front of HTML, or a header claiming 100000×100000 pixels, is refused.
#[tokio::test]
async fn images_are_decoded_before_they_are_stored() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let upload = |bytes: Vec<u8>| {
        let part = reqwest::multipart::Part::bytes(bytes).file_name("poster.png");
        let form = reqwest::multipart::Form::new().part("image", part);
        app.client.put(app.url(&format!("/api/v1/events/{event}/image"))).bearer_auth(&admin).multipart(form).send()
    };
    let mut polyglot = b"\x89PNG\r\n\x1a\n".to_vec();
    polyglot.extend_from_slice(b"<html><script>alert(document.cookie)</script></html>");
    tests::Response::from(upload(polyglot).await.unwrap()).await.assert_error(415, "unsupported_media_type");
    // A valid IHDR chunk (with its CRC) announcing 100000 × 100000 RGBA pixels.
    let huge = vec![
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x01,
        0x86, 0xa0, 0x00, 0x01, 0x86, 0xa0, 0x08, 0x06, 0x00, 0x00, 0x00, 0xa8, 0x52, 0x0b, 0xc8,
    ];
    tests::Response::from(upload(huge).await.unwrap()).await.assert_error(422, "image_too_large");
    let stored = std::fs::read_dir(app.images.join("events")).map(|dir| dir.count()).unwrap_or(0);
    assert_eq!(stored, 0, "nothing refused was stored");
    assert!(app.get(&format!("/api/v1/events/{event}"), None).await.json["image_url"].is_null());

    let mut good = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3])).write_to(&mut good, image::ImageFormat::Png).unwrap();
    let res = tests::Response::from(upload(good.into_inner()).await.unwrap()).await;
    assert_eq!(res.status, 200, "{}", res.body);
    let served = app.client.get(app.url(&format!("/api/v1/events/{event}/image"))).send().await.unwrap();
    assert_eq!(served.headers()["content-type"], "image/png");
    assert_eq!(served.headers()["x-content-type-options"], "nosniff");
}

/// Finding 8: security headers on every response, whatever its status; a client's request
/// id is echoed and logged only when short and printable.
#[tokio::test]
async fn every_response_carries_security_headers_and_request_ids_are_bounded() {
    let app = TestApp::spawn_process().await;
    for (path, status) in [("/api/v1/events", 200), ("/api/v1/nowhere", 404), ("/docs/", 200), ("/health/live", 200)] {
        let res = app.get(path, None).await;
        assert_eq!(res.status, status, "{path}");
        for (name, value) in [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("content-security-policy", "frame-ancestors 'none'"),
            ("referrer-policy", "no-referrer"),
        ] {
            assert_eq!(res.header(name), Some(value), "{path}: {name}");
        }
    }
    let send = |id: String| app.client.get(app.url("/health/live")).header("x-request-id", id).send();
    let kept = send("trace-1234".to_owned()).await.unwrap();
    assert_eq!(kept.headers()["x-request-id"], "trace-1234");
    let long = "a".repeat(10_000);
    let replaced = send(long.clone()).await.unwrap();
    let id = replaced.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.len() <= 128 && Uuid::parse_str(&id).is_ok(), "a fresh id instead of the long one: {id:.40}");
    let logs = serde_json::to_string(&app.api_logs()).unwrap();
    assert!(!logs.contains(&long[..200]), "the long id reached the logs");
}

/// Finding 8: `"status": null` in a payment webhook is a body of the wrong shape (422), not
/// malformed JSON (400); the same holds for every JSON body.
#[tokio::test]
async fn well_formed_json_of_the_wrong_shape_is_422() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (user, _) = app.signup("ada").await;
    let res = app.payment(Uuid::now_v7(), &json!({"status": null})).await;
    res.assert_error(422, "invalid_body");
    let res = app.patch(&format!("/api/v1/users/{user}/role"), &json!({"role": null}), Some(&admin)).await;
    res.assert_error(422, "invalid_body");
    let malformed = app
        .client
        .post(app.url("/api/v1/events"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send();
    tests::Response::from(malformed.await.unwrap()).await.assert_error(400, "malformed_json");
}
