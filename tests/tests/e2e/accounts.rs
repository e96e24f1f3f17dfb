//! Sign-up, log-in, tokens and the caller's own resources, over HTTP against the real api.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tests::{JWT_SECRET, PASSWORD, TestApp};
use uuid::Uuid;

#[tokio::test]
async fn signup_returns_the_account_and_login_returns_a_working_token() {
    let app = TestApp::spawn().await;
    let res = app
        .post(
            "/api/v1/signup",
            &json!({"name": "  Ada Lovelace ", "email": "  Ada@Example.COM ", "password": PASSWORD}),
            None,
        )
        .await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.json["name"], "Ada Lovelace");
    assert_eq!(res.json["email"], "ada@example.com", "email is normalised");
    assert_eq!(res.json["role"], "user");
    assert!(res.json.get("password").is_none() && res.json.get("password_hash").is_none());
    let id = res.json["id"].as_str().unwrap().parse::<Uuid>().unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUID v7");

    // Log in with a differently-cased address.
    let res = app.login("ADA@example.com", PASSWORD).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json["token_type"], "Bearer");
    assert_eq!(res.json["expires_in"], 3600);
    let token = res.json["access_token"].as_str().unwrap();

    let me = app.get("/api/v1/me", Some(token)).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(
        (me.json["id"].as_str(), me.json["email"].as_str()),
        (Some(id.to_string().as_str()), Some("ada@example.com"))
    );

    // The stored hash is argon2id with OWASP parameters, never the password.
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
}

#[tokio::test]
async fn duplicate_email_is_a_conflict_whatever_its_case() {
    let app = TestApp::spawn().await;
    let (_, email) = app.signup("Ada").await;
    let res = app
        .post("/api/v1/signup", &json!({"name": "Other", "email": email.to_uppercase(), "password": PASSWORD}), None)
        .await;
    res.assert_error(409, "email_taken");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn signup_input_is_validated() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({"name": "Ada", "email": "not-an-email", "password": PASSWORD}), 422, "invalid_email"),
        (json!({"name": "Ada", "email": "ada@example", "password": PASSWORD}), 422, "invalid_email"),
        (json!({"name": "Ada", "email": "ada@example.com", "password": "short"}), 422, "password_too_short"),
        (json!({"name": "Ada", "email": "ada@example.com", "password": "x".repeat(129)}), 422, "password_too_long"),
        (json!({"name": "   ", "email": "ada@example.com", "password": PASSWORD}), 422, "invalid_name"),
        (json!({"email": "ada@example.com", "password": PASSWORD}), 422, "invalid_body"),
        (json!({"name": 5, "email": "ada@example.com", "password": PASSWORD}), 422, "invalid_body"),
        (json!([1, 2]), 422, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let res = app.post("/api/v1/signup", &body, None).await;
        assert_eq!(res.status, status, "body {body}: {}", res.body);
        assert_eq!(res.json["error"]["code"], code, "body {body}: {}", res.body);
    }
    // Malformed JSON and a missing content type.
    let res = tests::Response::from(
        app.client
            .post(app.url("/api/v1/signup"))
            .header("content-type", "application/json")
            .body("{\"name\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    res.assert_error(400, "malformed_json");
    let res =
        tests::Response::from(app.client.post(app.url("/api/v1/signup")).body("name=ada").send().await.unwrap()).await;
    res.assert_error(415, "unsupported_media_type");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 0, "nothing invalid was stored");
}

#[tokio::test]
async fn wrong_credentials_get_the_same_401_whichever_part_is_wrong() {
    let app = TestApp::spawn().await;
    let (_, email) = app.signup("Ada").await;
    let wrong_password = app.login(&email, "not the password").await;
    let unknown_email = app.login("nobody@example.com", PASSWORD).await;
    let malformed_email = app.login("nobody", PASSWORD).await;
    for res in [&wrong_password, &unknown_email, &malformed_email] {
        res.assert_error(401, "unauthorized");
    }
    assert_eq!(wrong_password.json, unknown_email.json, "the answer must not reveal which part was wrong");
    assert_eq!(wrong_password.json, malformed_email.json);
}

fn forge(header: &Header, claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn claims(sub: Uuid, role: &str, exp_offset: i64, iss: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": sub, "role": role, "iss": iss, "iat": now, "exp": now + exp_offset})
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let (id, token) = app.user("Ada").await;
    let hs256 = Header::new(Algorithm::HS256);

    // A correctly forged token (same secret) works: the cases below differ in one thing each.
    let control = forge(&hs256, &claims(id, "user", 600, "turnstile"), JWT_SECRET.as_bytes());
    assert_eq!(app.get("/api/v1/me", Some(&control)).await.status, 200);

    let (header, payload, signature) = {
        let mut parts = token.split('.');
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
    };
    let admin_payload = {
        let mut value: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        value["role"] = json!("admin");
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&value).unwrap())
    };
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let cases = [
        ("garbage", "not-a-token".to_owned()),
        ("tampered payload (role changed)", format!("{header}.{admin_payload}.{signature}")),
        ("alg none", format!("{none_header}.{admin_payload}.")),
        ("expired", forge(&hs256, &claims(id, "user", -3600, "turnstile"), JWT_SECRET.as_bytes())),
        (
            "other HMAC algorithm",
            forge(&Header::new(Algorithm::HS512), &claims(id, "admin", 600, "turnstile"), JWT_SECRET.as_bytes()),
        ),
        ("other secret", forge(&hs256, &claims(id, "admin", 600, "turnstile"), b"some-other-secret-some-other-secret")),
        ("other issuer", forge(&hs256, &claims(id, "user", 600, "evil"), JWT_SECRET.as_bytes())),
    ];
    for (what, bad) in cases {
        let res = app.get("/api/v1/me", Some(&bad)).await;
        assert_eq!(res.status, 401, "{what}: {}", res.body);
        res.assert_error(401, "unauthorized");
        assert_eq!(res.header("www-authenticate"), Some("Bearer"), "{what}");
    }
    // Missing header, and a header that is not a bearer token.
    app.get("/api/v1/me", None).await.assert_error(401, "unauthorized");
    let res = tests::Response::from(
        app.client.get(app.url("/api/v1/me")).header("authorization", format!("Basic {token}")).send().await.unwrap(),
    )
    .await;
    res.assert_error(401, "unauthorized");
    // An expired token says so.
    let expired = forge(&hs256, &claims(id, "user", -3600, "turnstile"), JWT_SECRET.as_bytes());
    let res = app.get("/api/v1/me", Some(&expired)).await;
    assert!(res.json["error"]["message"].as_str().unwrap().contains("expired"), "{}", res.body);
}

#[tokio::test]
async fn me_events_lists_the_events_the_caller_created_as_the_go_api_did() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let other_admin = app.admin().await;
    let (_, buyer) = app.user("Ada").await;
    let mut mine = Vec::new();
    for name in ["One", "Two", "Three"] {
        let res = app.create_event(&admin, json!({"name": name})).await;
        mine.push(res.json["id"].as_str().unwrap().to_owned());
    }
    app.create_event(&other_admin, json!({"name": "Not mine"})).await;
    let deleted = app.create_event(&admin, json!({"name": "Deleted"})).await;
    let deleted_id = deleted.json["id"].as_str().unwrap();
    assert_eq!(app.delete(&format!("/api/v1/events/{deleted_id}"), Some(&admin)).await.status, 204);

    // Newest first, the other admin's and the deleted one left out, in pages.
    let first = app.get("/api/v1/me/events?limit=2", Some(&admin)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let names: Vec<&str> = first.json.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Three", "Two"]);
    let next = first.header("x-next-cursor").expect("a next page").to_owned();
    let second = app.get(&format!("/api/v1/me/events?limit=2&cursor={next}"), Some(&admin)).await;
    assert_eq!(second.json.as_array().unwrap().len(), 1, "{}", second.body);
    assert_eq!(second.json[0]["id"], mine[0].as_str());
    assert!(second.header("x-next-cursor").is_none());

    // A buyer created none; bad pages and no token are refused.
    assert_eq!(app.get("/api/v1/me/events", Some(&buyer)).await.json, json!([]));
    app.get("/api/v1/me/events?limit=0", Some(&admin)).await.assert_error(400, "invalid_query");
    app.get("/api/v1/me/events", None).await.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn me_tickets_lists_the_events_the_caller_holds_tickets_for() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (ada, ada_token) = app.user("Ada").await;
    let (bob, bob_token) = app.user("Bob").await;
    let first = app.create_event(&admin, json!({"name": "First"})).await;
    let second = app.create_event(&admin, json!({"name": "Second"})).await;
    let first_id: Uuid = first.json["id"].as_str().unwrap().parse().unwrap();
    let second_id: Uuid = second.json["id"].as_str().unwrap().parse().unwrap();

    assert_eq!(app.get("/api/v1/me/tickets", Some(&ada_token)).await.json, json!([]));

    // Orders come from the purchase pipeline; here they are written directly.
    async fn order(app: &TestApp, user: Uuid, event: Uuid, status: &str, tickets: i32) {
        let order = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, status, lines)
             VALUES ($1, $2, $3, $4, 49.90, 49.90 * $4, $5, '[]')",
        )
        .bind(order)
        .bind(user)
        .bind(event)
        .bind(tickets)
        .bind(status)
        .execute(&app.db.pool)
        .await
        .unwrap();
        for _ in 0..tickets {
            sqlx::query(
                "INSERT INTO tickets (id, order_id, event_id, ticket_type_id)
                 SELECT $1, $2, id, default_ticket_type_id FROM events WHERE id = $3",
            )
            .bind(Uuid::now_v7())
            .bind(order)
            .bind(event)
            .execute(&app.db.pool)
            .await
            .unwrap();
        }
    }
    order(&app, ada, first_id, "PAID", 2).await;
    order(&app, ada, first_id, "PENDING", 1).await;
    order(&app, ada, second_id, "QUEUED", 1).await; // not yet allocated: not listed
    order(&app, bob, second_id, "PAID", 3).await;

    let mine = app.get("/api/v1/me/tickets", Some(&ada_token)).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    let list = mine.json.as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", mine.body);
    assert_eq!(list[0]["id"], first_id.to_string());
    assert_eq!(list[0]["name"], "First");
    assert_eq!(list[0]["my_tickets"], 3);

    let bobs = app.get("/api/v1/me/tickets", Some(&bob_token)).await;
    assert_eq!(bobs.json.as_array().unwrap().len(), 1);
    assert_eq!(bobs.json[0]["id"], second_id.to_string());
    assert_eq!(bobs.json[0]["my_tickets"], 3);

    app.get("/api/v1/me/tickets", None).await.assert_error(401, "unauthorized");
}

#[tokio::test]
async fn create_admin_promotes_an_existing_user() {
    let app = TestApp::spawn().await;
    let (_, email) = app.signup("Ada").await;
    let (ok, stdout, stderr) = tests::run(
        "api",
        &["create-admin", "--email", &email.to_uppercase()],
        &[("DATABASE_URL", app.db.url.clone())],
        None,
    );
    assert!(ok, "{stdout} {stderr}");
    assert!(stdout.contains("now has the admin role"), "{stdout}");
    let token = app.token_for(&email).await;
    assert_eq!(app.get("/api/v1/me", Some(&token)).await.json["role"], "admin");

    // A short password is refused with a clear message, and nothing is created.
    let (ok, _, stderr) = tests::run(
        "api",
        &["create-admin", "--email", "new-admin@example.com", "--password", "short"],
        &[("DATABASE_URL", app.db.url.clone())],
        None,
    );
    assert!(!ok);
    assert!(stderr.contains("password must be at least 8 characters"), "{stderr}");
}

#[tokio::test]
async fn users_edit_their_own_account() {
    let app = TestApp::spawn().await;
    let (_, email) = app.signup("Grace").await;
    let (_, other_email) = app.signup("Other").await;
    let token = app.token_for(&email).await;

    let res = app.patch("/api/v1/me", &json!({"name": "  Grace Hopper "}), Some(&token)).await;
    assert_eq!((res.status, res.json["name"].as_str()), (200, Some("Grace Hopper")), "{}", res.body);
    app.patch("/api/v1/me", &json!({"name": ""}), Some(&token)).await.assert_error(422, "invalid_name");
    app.patch("/api/v1/me", &json!({"role": "admin"}), Some(&token)).await.assert_error(422, "invalid_body");
    app.patch("/api/v1/me", &json!({"name": "X"}), None).await.assert_error(401, "unauthorized");

    // Email and password need the current password.
    let new_email = format!("grace-{}@example.com", Uuid::new_v4().simple());
    let res = app.patch("/api/v1/me", &json!({"email": new_email}), Some(&token)).await;
    res.assert_error(422, "current_password_required");
    let res =
        app.patch("/api/v1/me", &json!({"email": new_email, "current_password": "wrong password"}), Some(&token)).await;
    res.assert_error(403, "invalid_current_password");
    let res = app.patch("/api/v1/me", &json!({"email": other_email, "current_password": PASSWORD}), Some(&token)).await;
    res.assert_error(409, "email_taken");
    let res = app
        .patch("/api/v1/me", &json!({"email": new_email.to_uppercase(), "current_password": PASSWORD}), Some(&token))
        .await;
    assert_eq!((res.status, res.json["email"].as_str()), (200, Some(new_email.as_str())), "{}", res.body);
    assert_eq!(app.login(&email, PASSWORD).await.status, 401, "the old email no longer logs in");
    assert_eq!(app.login(&new_email, PASSWORD).await.status, 200);

    let res = app.patch("/api/v1/me", &json!({"password": "short", "current_password": PASSWORD}), Some(&token)).await;
    res.assert_error(422, "password_too_short");
    let res = app
        .patch("/api/v1/me", &json!({"password": "a brand new secret", "current_password": PASSWORD}), Some(&token))
        .await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert!(res.json.get("password_hash").is_none());
    assert_eq!(app.login(&new_email, PASSWORD).await.status, 401, "the old password no longer works");
    assert_eq!(app.login(&new_email, "a brand new secret").await.status, 200);
}

#[tokio::test]
async fn admins_list_accounts_and_change_roles() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (user_id, user_email) = app.signup("Member").await;
    let user = app.token_for(&user_email).await;

    app.get("/api/v1/users", Some(&user)).await.assert_error(403, "forbidden");
    let page = app.get("/api/v1/users?limit=1", Some(&admin)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.json.as_array().unwrap().len(), 1);
    assert_eq!(page.json[0]["id"], user_id.to_string(), "newest first");
    assert!(page.header("link").is_some(), "a second page follows");
    assert!(page.json[0].get("password_hash").is_none());

    let path = format!("/api/v1/users/{user_id}/role");
    app.patch(&path, &json!({"role": "admin"}), Some(&user)).await.assert_error(403, "forbidden");
    app.patch(&path, &json!({"role": "owner"}), Some(&admin)).await.assert_error(422, "invalid_body");
    app.patch(&format!("/api/v1/users/{}/role", Uuid::now_v7()), &json!({"role": "admin"}), Some(&admin))
        .await
        .assert_error(404, "not_found");
    let res = app.patch(&path, &json!({"role": "admin"}), Some(&admin)).await;
    assert_eq!((res.status, res.json["role"].as_str()), (200, Some("admin")), "{}", res.body);
    // The role travels in the token: it applies from the next log-in.
    let promoted = app.token_for(&user_email).await;
    assert_eq!(app.get("/api/v1/users", Some(&promoted)).await.status, 200);

    // Two admins: one may step down, the last may not.
    let me: Value = app.get("/api/v1/me", Some(&admin)).await.json;
    let admin_id = me["id"].as_str().unwrap();
    let res = app.patch(&format!("/api/v1/users/{admin_id}/role"), &json!({"role": "user"}), Some(&promoted)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    app.patch(&path, &json!({"role": "user"}), Some(&promoted)).await.assert_error(409, "last_admin");
}
