//! Requests as tests make them: users and tokens, events, orders and payments, and their
//! answers read whole.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{JWT_SECRET, PASSWORD, TestApp, WEBHOOK_SECRET, run};

impl TestApp {
    /// `n` users inserted straight into the database (skipping argon2, which is not what
    /// these tests are about) with tokens signed by the api's key: (id, token).
    pub async fn buyers(&self, n: usize) -> Vec<(Uuid, String)> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let emails: Vec<String> = ids.iter().map(|id| format!("buyer-{}@example.com", id.simple())).collect();
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash)
             SELECT id, email, 'Buyer', 'not-a-password-hash' FROM UNNEST($1::uuid[], $2::text[]) AS u(id, email)",
        )
        .bind(&ids)
        .bind(&emails)
        .execute(&self.db.pool)
        .await
        .expect("insert buyers");
        ids.into_iter().map(|id| (id, mint_token(id, "user"))).collect()
    }

    /// Buys `quantity` tickets and waits until the order is `PENDING` (a worker must run).
    pub async fn pending_order(&self, token: &str, event_id: Uuid, quantity: i64) -> Uuid {
        let res = self.order(token, event_id, quantity, None).await;
        assert_eq!(res.status, 202, "{}", res.body);
        let id: Uuid = res.json["id"].as_str().expect("order id").parse().expect("uuid");
        // `status=QUEUED`: answer as soon as the order is anything else, even if that
        // happened before this request.
        let res = self.get(&format!("/api/v1/orders/{id}?wait=30&status=QUEUED"), Some(token)).await;
        assert_eq!(res.json["status"], "PENDING", "{}", res.body);
        id
    }

    /// The payment provider's webhook for `order_id`, signed with the api's key under a new
    /// webhook id, now.
    pub async fn payment(&self, order_id: Uuid, body: &Value) -> Response {
        let body = body.to_string();
        let id = format!("msg_{}", Uuid::new_v4().simple());
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign_webhook(WEBHOOK_SECRET.as_bytes(), &id, timestamp, &body);
        self.raw_payment(
            order_id,
            &body,
            &[("webhook-id", id), ("webhook-timestamp", timestamp.to_string()), ("webhook-signature", signature)],
        )
        .await
    }

    /// `POST /api/v1/orders/{id}/status` with exactly this body and these headers.
    pub async fn raw_payment(
        &self,
        order_id: impl std::fmt::Display,
        body: &str,
        headers: &[(&str, String)],
    ) -> Response {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/orders/{order_id}/status")))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// Waits (long-polls, up to 30 s) for the order to leave `QUEUED` and returns its JSON.
    pub async fn outcome(&self, token: &str, order_id: Uuid) -> Value {
        self.get(&format!("/api/v1/orders/{order_id}?wait=30&status=QUEUED"), Some(token)).await.json
    }

    /// `POST /api/v1/orders` with an optional Idempotency-Key.
    pub async fn order(&self, token: &str, event_id: Uuid, quantity: i64, key: Option<&str>) -> Response {
        self.order_at(&self.base, token, event_id, quantity, key).await
    }

    /// [`Self::order`] to the api at `base` (another process of this test's).
    pub async fn order_at(
        &self,
        base: &str,
        token: &str,
        event_id: Uuid,
        quantity: i64,
        key: Option<&str>,
    ) -> Response {
        let mut request = self
            .client
            .post(format!("{base}/api/v1/orders"))
            .bearer_auth(token)
            .json(&json!({"event_id": event_id, "quantity": quantity}));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// `POST /api/v1/orders/quote` of `quantity` tickets to the api at `base`.
    pub async fn quote_at(&self, base: &str, token: &str, event_id: Uuid, quantity: i64) -> Response {
        let request = self
            .client
            .post(format!("{base}/api/v1/orders/quote"))
            .bearer_auth(token)
            .json(&json!({"event_id": event_id, "quantity": quantity}));
        Response::from(request.send().await.expect("request sent")).await
    }

    /// Creates an event with `capacity` and `max_per_order`, without a buyer cap (lifted on
    /// purpose: the stampedes that use it let few buyers place many orders), and returns its
    /// id. [`TestApp::create_event`] leaves the cap to its default.
    pub async fn event_with(&self, admin_token: &str, capacity: i64, max_per_order: i64) -> Uuid {
        let body = json!({"capacity": capacity, "max_per_order": max_per_order, "max_per_buyer": null});
        let res = self.create_event(admin_token, body).await;
        assert_eq!(res.status, 201, "{}", res.body);
        res.json["id"].as_str().expect("event id").parse().expect("uuid")
    }

    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn patch(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let mut request = self.client.patch(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.delete(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    /// Signs a user up and returns (id, email).
    pub async fn signup(&self, name: &str) -> (Uuid, String) {
        let email = format!("{}-{}@example.com", name.to_lowercase(), Uuid::new_v4().simple());
        let res = self.post("/api/v1/signup", &json!({"name": name, "email": email, "password": PASSWORD}), None).await;
        assert_eq!(res.status, 201, "signup failed: {}", res.body);
        (res.json["id"].as_str().expect("id").parse().expect("uuid"), email)
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post("/api/v1/login", &json!({"email": email, "password": password}), None).await
    }

    /// Signs a user up, logs in and returns (id, token).
    pub async fn user(&self, name: &str) -> (Uuid, String) {
        let (id, email) = self.signup(name).await;
        (id, self.token_for(&email).await)
    }

    pub async fn token_for(&self, email: &str) -> String {
        let res = self.login(email, PASSWORD).await;
        assert_eq!(res.status, 200, "login failed: {}", res.body);
        res.json["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Creates an admin through the real `api create-admin` subcommand and returns a token.
    pub async fn admin(&self) -> String {
        let email = format!("admin-{}@example.com", Uuid::new_v4().simple());
        let (ok, stdout, stderr) = run(
            "api",
            &["create-admin", "--email", &email, "--name", "Admin"],
            &[("DATABASE_URL", self.db.url.clone())],
            Some(&format!("{PASSWORD}\n")),
        );
        assert!(ok, "create-admin failed: {stdout} {stderr}");
        self.token_for(&email).await
    }

    /// Creates an event as `admin_token` with the given overrides of a valid body.
    pub async fn create_event(&self, admin_token: &str, overrides: Value) -> Response {
        let mut body = json!({
            "name": "Turnstile Live",
            "location": "Main Hall",
            "organization": "Turnstile Concerts",
            "rating": "all-ages",
            "date": (chrono::Utc::now() + chrono::Duration::days(30)).to_rfc3339(),
            "capacity": 100,
            "price": "49.90",
            "max_per_order": 4,
            "description": "An evening of queueing theory",
        });
        if let (Some(body), Some(overrides)) = (body.as_object_mut(), overrides.as_object()) {
            for (key, value) in overrides {
                body.insert(key.clone(), value.clone());
            }
        }
        self.post("/api/v1/events", &body, Some(admin_token)).await
    }
}

/// `GET url` with `token` until it answers 401 (at most a second: a revocation reaches
/// other api processes by notification); returns the last status.
pub async fn refused_within_a_second(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    let mut status = 0;
    for _ in 0..50 {
        status = client.get(url).bearer_auth(token).send().await.unwrap().status().as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status
}

/// A Standard Webhooks signature, computed here independently of the api's code:
/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign_webhook(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// An access token signed with the test api's key, as `api` itself would issue it.
pub fn mint_token(user: Uuid, role: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user, "role": role, "iss": "turnstile", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign token")
}

/// A response read whole: status, headers, raw body and the body as JSON (Null if not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub json: Value,
}

impl Response {
    pub async fn from(res: reqwest::Response) -> Self {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.expect("response body");
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        Response { status, headers, body, json }
    }

    /// Asserts the status and the error shape `{"error": {"code", "message"}}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.body);
        assert_eq!(self.json["error"]["code"], code, "unexpected error code; body: {}", self.body);
        assert!(
            self.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.body
        );
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}
