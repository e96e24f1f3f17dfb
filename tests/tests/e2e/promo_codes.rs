//! Promo codes end to end: admin CRUD with every refusal, buying with a code (prices,
//! discounts, refusals at accept), and the worker's exact counting of uses: a stampede of
//! 300 buyers against `max_uses` 50, one buyer's concurrent orders against
//! `max_uses_per_buyer`, and uses given back by cancelled and expired holds.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::{Response, TestApp, worker_decides};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

fn id_of(res: &Response) -> Uuid {
    assert!(res.status == 201 || res.status == 202, "{}", res.body);
    res.json["id"].as_str().expect("id").parse().expect("uuid")
}

fn codes_path(event: Uuid) -> String {
    format!("/api/v1/events/{event}/promo-codes")
}

async fn add_code(app: &TestApp, admin: &str, event: Uuid, body: Value) -> Uuid {
    id_of(&app.post(&codes_path(event), &body, Some(admin)).await)
}

async fn order_with(app: &TestApp, token: &str, event: Uuid, quantity: i64, code: &str) -> Response {
    app.post("/api/v1/orders", &json!({"event_id": event, "quantity": quantity, "promo_code": code}), Some(token)).await
}

/// `POST /api/v1/orders` with this body and `Idempotency-Key`.
async fn order_keyed(app: &TestApp, token: &str, body: &Value, key: &str) -> Response {
    let request =
        app.client.post(app.url("/api/v1/orders")).bearer_auth(token).json(body).header("idempotency-key", key);
    Response::from(request.send().await.expect("request sent")).await
}

async fn uses(app: &TestApp, code: Uuid) -> i32 {
    sqlx::query_scalar("SELECT uses FROM promo_codes WHERE id = $1").bind(code).fetch_one(&app.db.pool).await.unwrap()
}

/// (status, reason) → (orders, tickets).
async fn outcomes(app: &TestApp, event: Uuid) -> std::collections::HashMap<(String, Option<String>), (i64, i64)> {
    let rows: Vec<(String, Option<String>, i64, i64)> =
        sqlx::query_as("SELECT status, reason, count(*), sum(quantity) FROM orders WHERE event_id = $1 GROUP BY 1, 2")
            .bind(event)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(s, r, n, t)| ((s, r), (n, t))).collect()
}

async fn default_type(app: &TestApp, event: Uuid) -> Uuid {
    app.get(&format!("/api/v1/events/{event}"), None).await.json["default_ticket_type_id"]
        .as_str()
        .expect("a default type")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn admins_manage_promo_codes_and_every_refusal_has_its_code() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 4).await;
    let general = default_type(&app, event).await;
    let path = codes_path(event);

    let body = json!({"code": "EarlyBird", "percent_off": 15, "max_uses": 10, "max_uses_per_buyer": 2,
                      "ticket_type_ids": [general], "valid_until": "2099-01-01T00:00:00Z"});
    let created = app.post(&path, &body, Some(&admin)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let code = id_of(&created);
    assert_eq!(created.header("location"), Some(format!("{path}/{code}").as_str()));
    let shown = &created.json;
    assert_eq!(
        (&shown["code"], &shown["percent_off"], &shown["amount_off"], &shown["currency"], &shown["uses"]),
        (&json!("EarlyBird"), &json!("15.00"), &Value::Null, &json!("EUR"), &json!(0))
    );
    assert_eq!((&shown["max_uses"], &shown["ticket_type_ids"]), (&json!(10), &json!([general])));
    assert_eq!(app.get(&format!("{path}/{code}"), Some(&admin)).await.json, created.json);

    // Who may: admins only, of an event that exists.
    app.post(&path, &json!({"code": "MINE"}), Some(&buyer)).await.assert_error(403, "forbidden");
    app.post(&path, &json!({"code": "MINE"}), None).await.assert_error(401, "unauthorized");
    app.get(&path, Some(&buyer)).await.assert_error(403, "forbidden");
    app.get(&format!("{path}/{code}"), Some(&buyer)).await.assert_error(403, "forbidden");
    let nowhere = codes_path(Uuid::now_v7());
    app.post(&nowhere, &json!({"code": "MINE"}), Some(&admin)).await.assert_error(404, "not_found");
    app.get(&nowhere, Some(&admin)).await.assert_error(404, "not_found");
    app.get(&format!("{path}/{}", Uuid::now_v7()), Some(&admin)).await.assert_error(404, "not_found");

    // What may: each rule refused with its code.
    for (body, code) in [
        (json!({"code": "ab"}), "validation_failed"),
        (json!({"code": "has space"}), "validation_failed"),
        (json!({"code": "x".repeat(65)}), "validation_failed"),
        (json!({"code": "BOTH", "percent_off": 10, "amount_off": "1.00"}), "validation_failed"),
        (json!({"code": "ZERO", "percent_off": 0}), "validation_failed"),
        (json!({"code": "OVER", "percent_off": "100.01"}), "validation_failed"),
        (json!({"code": "FINE", "percent_off": "12.345"}), "validation_failed"),
        (json!({"code": "NEG", "amount_off": "-1"}), "validation_failed"),
        (json!({"code": "CENTS", "amount_off": "1.001"}), "validation_failed"),
        (json!({"code": "NOTYPES", "ticket_type_ids": []}), "validation_failed"),
        (json!({"code": "TWICE", "ticket_type_ids": [general, general]}), "validation_failed"),
        (json!({"code": "ELSEWHERE", "ticket_type_ids": [Uuid::now_v7()]}), "unknown_ticket_type"),
        (json!({"code": "NOUSE", "max_uses": 0}), "validation_failed"),
        (json!({"code": "NOBUYER", "max_uses_per_buyer": -1}), "validation_failed"),
        (
            json!({"code": "BACKWARDS", "valid_from": "2030-01-02T00:00:00Z", "valid_until": "2030-01-01T00:00:00Z"}),
            "validation_failed",
        ),
        (json!({"code": "EXTRA", "free": true}), "invalid_body"),
        (json!({"percent_off": 5}), "invalid_body"),
    ] {
        app.post(&path, &body, Some(&admin)).await.assert_error(422, code);
    }
    // Unique per event whatever the case; another event may have the same code.
    app.post(&path, &json!({"code": "earlybird"}), Some(&admin)).await.assert_error(409, "promo_code_exists");
    let other = app.event_with(&admin, 10, 4).await;
    add_code(&app, &admin, other, json!({"code": "EARLYBIRD"})).await;

    // Edits: any subset, `null` clears; the same rules.
    let access = add_code(&app, &admin, event, json!({"code": "BACKSTAGE"})).await;
    let edited =
        app.patch(&format!("{path}/{code}"), &json!({"percent_off": null, "amount_off": "5.50"}), Some(&admin)).await;
    assert_eq!(edited.status, 200, "{}", edited.body);
    assert_eq!((&edited.json["percent_off"], &edited.json["amount_off"]), (&Value::Null, &json!("5.50")));
    let cleared = app.patch(&format!("{path}/{code}"), &json!({"ticket_type_ids": null}), Some(&admin)).await;
    assert_eq!(cleared.json["ticket_type_ids"], Value::Null);
    app.patch(&format!("{path}/{code}"), &json!({"percent_off": 10}), Some(&admin))
        .await
        .assert_error(422, "validation_failed");
    app.patch(&format!("{path}/{code}"), &json!({"code": "backstage"}), Some(&admin))
        .await
        .assert_error(409, "promo_code_exists");
    app.patch(&format!("{path}/{code}"), &json!({"unknown": 1}), Some(&admin)).await.assert_error(422, "invalid_body");
    app.patch(&format!("{path}/{code}"), &json!({"max_uses": 1}), Some(&buyer)).await.assert_error(403, "forbidden");

    // A list, newest first, a page at a time.
    let page = app.get(&format!("{path}?limit=1"), Some(&admin)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.json.as_array().unwrap().len(), 1);
    assert_eq!(page.json[0]["id"], json!(access));
    let next = page.header("x-next-cursor").expect("a next page").to_owned();
    let rest = app.get(&format!("{path}?limit=1&cursor={next}"), Some(&admin)).await;
    assert_eq!(rest.json[0]["id"], json!(code));
    app.get(&format!("{path}?limit=0"), Some(&admin)).await.assert_error(400, "invalid_query");

    // Withdrawn: shown to admins with when, not editable, not withdrawn twice; its name is
    // free again.
    assert_eq!(app.delete(&format!("{path}/{access}"), Some(&buyer)).await.status, 403);
    assert_eq!(app.delete(&format!("{path}/{access}"), Some(&admin)).await.status, 204);
    app.delete(&format!("{path}/{access}"), Some(&admin)).await.assert_error(404, "not_found");
    assert!(app.get(&format!("{path}/{access}"), Some(&admin)).await.json["withdrawn_at"].is_string());
    app.patch(&format!("{path}/{access}"), &json!({"max_uses": 3}), Some(&admin)).await.assert_error(404, "not_found");
    add_code(&app, &admin, event, json!({"code": "Backstage"})).await;
    assert_eq!(app.get(&path, Some(&admin)).await.json.as_array().unwrap().len(), 3);

    // At most 1,000 live codes per event (the api keeps them in memory with the event).
    sqlx::query(
        "INSERT INTO promo_codes (id, event_id, code)
         SELECT gen_random_uuid(), $1, 'BULK-' || n FROM generate_series(1, 998) AS n",
    )
    .bind(event)
    .execute(&app.db.pool)
    .await
    .unwrap();
    app.post(&path, &json!({"code": "ONE-TOO-MANY"}), Some(&admin)).await.assert_error(409, "too_many_promo_codes");
}

#[tokio::test]
async fn a_code_prices_the_lines_it_names_and_a_code_that_cannot_be_used_is_refused_at_once() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 10).await; // General at 49.90
    let general = default_type(&app, event).await;
    let vip = id_of(
        &app.post(
            &format!("/api/v1/events/{event}/ticket-types"),
            &json!({"name": "VIP", "price": "120.00"}),
            Some(&admin),
        )
        .await,
    );
    add_code(&app, &admin, event, json!({"code": "VIP-THIRD", "percent_off": "33.33", "ticket_type_ids": [vip]})).await;
    add_code(&app, &admin, event, json!({"code": "LATER", "valid_from": "2099-01-01T00:00:00Z"})).await;
    add_code(&app, &admin, event, json!({"code": "GONE", "valid_until": "2000-01-01T00:00:00Z"})).await;
    let withdrawn = add_code(&app, &admin, event, json!({"code": "WITHDRAWN"})).await;
    assert_eq!(app.delete(&format!("{}/{withdrawn}", codes_path(event)), Some(&admin)).await.status, 204);
    add_code(&app, &admin, event, json!({"code": "FREEBIE", "amount_off": "60"})).await;

    // 120.00 × (1 − 33.33%) = 80.004 → 80.00 per VIP ticket; General keeps its price.
    let body = json!({"event_id": event, "promo_code": "vip-third",
                      "items": [{"ticket_type_id": vip, "quantity": 2}, {"ticket_type_id": general, "quantity": 1}]});
    let quote = app.post("/api/v1/orders/quote", &body, Some(&buyer)).await;
    assert_eq!(quote.status, 200, "{}", quote.body);
    assert_eq!(
        (&quote.json["total"], &quote.json["discount"], &quote.json["promo_code"]),
        (&json!("209.90"), &json!("80.00"), &json!("VIP-THIRD"))
    );
    let placed = app.post("/api/v1/orders", &body, Some(&buyer)).await;
    assert_eq!(placed.status, 202, "{}", placed.body);
    let items = &placed.json["items"];
    assert_eq!((&items[0]["unit_price"], &items[0]["list_price"]), (&json!("80.00"), &json!("120.00")));
    assert_eq!((&items[1]["unit_price"], &items[1].get("list_price")), (&json!("49.90"), &None));
    let decided = app.outcome(&buyer, id_of(&placed)).await;
    assert_eq!(
        (&decided["status"], &decided["total"], &decided["discount"], &decided["promo_code"]),
        (&json!("PENDING"), &json!("209.90"), &json!("80.00"), &json!("VIP-THIRD"))
    );
    let code_id: Uuid = sqlx::query_scalar("SELECT id FROM promo_codes WHERE code = 'VIP-THIRD'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(uses(&app, code_id).await, 2, "the two VIP tickets, not the General one");
    // The organizer's export names the code, and the discount.
    let csv = app.get(&format!("/api/v1/events/{event}/orders?format=csv"), Some(&admin)).await.body;
    assert!(csv.contains(",209.90,EUR,VIP-THIRD,80.00,PENDING,"), "{csv}");

    // A code that takes a line's whole price makes it free; a free order is paid at once.
    let free = order_with(&app, &buyer, event, 2, "FREEBIE").await;
    assert_eq!((&free.json["total"], &free.json["discount"]), (&json!("0.00"), &json!("99.80")));
    let free = app.outcome(&buyer, id_of(&free)).await;
    assert_eq!((&free["status"], &free["reason"]), (&json!("PAID"), &json!("FREE_ORDER")));

    // Refused at accept, each saying what is wrong.
    for (code, says) in [
        ("NOSUCH", "not a promo code"),
        ("withdrawn", "withdrawn"),
        ("LATER", "valid from"),
        ("GONE", "expired"),
        ("VIP-THIRD", "none of the ticket types"),
        ("a b", "3 to 64"),
    ] {
        for path in ["/api/v1/orders", "/api/v1/orders/quote"] {
            let res =
                app.post(path, &json!({"event_id": event, "quantity": 1, "promo_code": code}), Some(&buyer)).await;
            res.assert_error(422, "invalid_promo_code");
            assert!(res.json["error"]["message"].as_str().unwrap().contains(says), "{code}: {}", res.body);
        }
    }

    // A replay of the same key answers only the same code.
    let key = |res: &Response| res.json["id"].clone();
    let coded = |code: &str| json!({"event_id": event, "quantity": 1, "promo_code": code});
    let first = order_keyed(&app, &buyer, &coded("FREEBIE"), "k-1").await;
    let again = order_keyed(&app, &buyer, &coded("freebie"), "k-1").await;
    assert_eq!((again.status, key(&again)), (202, key(&first)));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    order_keyed(&app, &buyer, &json!({"event_id": event, "quantity": 1}), "k-1")
        .await
        .assert_error(422, "idempotency_key_reused");
    app.wait_until_final(SETTLE).await;
    app.assert_consistent(event).await;
}

/// 300 buyers at once, one code with `max_uses` 50 on an event of 1,000: exactly 50 tickets
/// under the code, 250 orders `PROMO_CODE_USED_UP`; then orders of 1 to 3 tickets: never 51.
#[tokio::test]
async fn a_stampede_never_redeems_a_code_past_its_limit() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(|c| c.batch_size = 32).await;
    let admin = app.admin().await;
    let buyers = app.buyers(300).await;
    for sizes in [[1, 1, 1], [1, 2, 3]] {
        let event = app.event_with(&admin, 1_000, 4).await;
        let code = add_code(&app, &admin, event, json!({"code": "FIFTY", "percent_off": 50, "max_uses": 50})).await;
        let app_ref = &app;
        let responses = join_all(
            buyers
                .iter()
                .enumerate()
                .map(|(i, (_, token))| async move { order_with(app_ref, token, event, sizes[i % 3], "fifty").await }),
        )
        .await;
        assert!(responses.iter().all(|r| r.status == 202), "every order accepted");
        app.wait_until_final(SETTLE).await;

        assert_eq!(uses(&app, code).await, 50, "sizes {sizes:?}");
        let counts = outcomes(&app, event).await;
        let (held, tickets) = counts[&("PENDING".into(), None)];
        let (used_up, _) = counts[&("REJECTED".into(), Some("PROMO_CODE_USED_UP".into()))];
        assert_eq!(tickets, 50, "{counts:?}");
        assert_eq!(held + used_up, 300, "every other order is refused for the code: {counts:?}");
        if sizes == [1, 1, 1] {
            assert_eq!((held, used_up), (50, 250));
        }
        assert_eq!(app.assert_consistent(event).await, (1_000, 50));
    }
}

/// One buyer's 20 concurrent orders against `max_uses_per_buyer` 2: exactly 2 tickets; and
/// uses come back when holds are cancelled or expire, to the next orders in line.
#[tokio::test]
async fn a_buyer_cannot_pass_the_per_buyer_limit_and_released_uses_return() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let worker = app.worker_with(|c| (c.batch_size, c.hold_ttl_secs, c.expiry_interval_ms) = (4, 3, 3_600_000)).await;
    let admin = app.admin().await;
    let buyers = app.buyers(3).await;
    let (eager, second, third) = (&buyers[0].1, &buyers[1].1, &buyers[2].1);
    let event = app.event_with(&admin, 100, 4).await;
    let code = add_code(&app, &admin, event, json!({"code": "PAIR", "max_uses": 3, "max_uses_per_buyer": 2})).await;

    let responses = join_all((0..20).map(|_| order_with(&app, eager, event, 1, "PAIR"))).await;
    assert!(responses.iter().all(|r| r.status == 202));
    app.wait_until_final(SETTLE).await;
    let counts = outcomes(&app, event).await;
    assert_eq!(counts[&("PENDING".into(), None)], (2, 2), "{counts:?}");
    assert_eq!(counts[&("REJECTED".into(), Some("PROMO_CODE_BUYER_LIMIT".into()))], (18, 18), "{counts:?}");
    // Without the code the same buyer still buys.
    let plain = id_of(&app.order(eager, event, 1, None).await);
    assert_eq!(app.outcome(eager, plain).await["status"], "PENDING");

    // One use is left: the second buyer's two are refused, one fits.
    let two = id_of(&order_with(&app, second, event, 2, "PAIR").await);
    let refused = app.outcome(second, two).await;
    assert_eq!((&refused["status"], &refused["reason"]), (&json!("REJECTED"), &json!("PROMO_CODE_USED_UP")));
    let one = id_of(&order_with(&app, second, event, 1, "PAIR").await);
    assert_eq!(app.outcome(second, one).await["status"], "PENDING");
    assert_eq!(uses(&app, code).await, 3);
    // max_uses never below the uses held.
    app.patch(&format!("{}/{code}", codes_path(event)), &json!({"max_uses": 2}), Some(&admin))
        .await
        .assert_error(409, "max_uses_below_uses");
    let used_up = id_of(&order_with(&app, third, event, 1, "PAIR").await);
    assert_eq!(app.outcome(third, used_up).await["reason"], "PROMO_CODE_USED_UP");

    // A cancelled hold gives its use back to the next order in line.
    assert_eq!(app.post(&format!("/api/v1/orders/{one}/cancel"), &json!({}), Some(second)).await.status, 200);
    assert_eq!(uses(&app, code).await, 2);
    let next = id_of(&order_with(&app, third, event, 1, "PAIR").await);
    assert_eq!(app.outcome(third, next).await["status"], "PENDING");
    assert_eq!(uses(&app, code).await, 3);

    // Expired holds give theirs back too (the expiry loop, an hour apart here, is stepped).
    app.wait_past_holds(event).await;
    assert!(worker.steps().expiry().await);
    assert_eq!(uses(&app, code).await, 0);
    let after = id_of(&order_with(&app, third, event, 1, "PAIR").await);
    assert_eq!(app.outcome(third, after).await["status"], "PENDING");
    assert_eq!(uses(&app, code).await, 1);
    app.assert_consistent(event).await;
}

/// A type that requires a code: listed only to admins and with `?promo_code=` a live code
/// naming it; refused at accept without such a code, even bought by its id, and by the
/// worker when it came to require one after the order was accepted.
#[tokio::test]
async fn a_type_that_requires_a_code_is_listed_and_sold_only_with_one() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 4).await;
    let types_path = format!("/api/v1/events/{event}/ticket-types");
    let crew_body = json!({"name": "Crew", "price": "0", "requires_promo_code": true});
    let crew = id_of(&app.post(&types_path, &crew_body, Some(&admin)).await);
    let vip = id_of(&app.post(&types_path, &json!({"name": "VIP", "price": "100"}), Some(&admin)).await);
    add_code(&app, &admin, event, json!({"code": "CREW-2026", "ticket_type_ids": [crew]})).await;
    add_code(&app, &admin, event, json!({"code": "VIPDEAL", "percent_off": 10, "ticket_type_ids": [vip]})).await;

    // Listed to admins, and to holders of a code naming it; by its id to whoever has it.
    let names = |listed: &Value| -> Vec<String> {
        listed.as_array().expect("types").iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    let event_path = format!("/api/v1/events/{event}");
    for (query, token, crew_listed) in [
        ("", None, false),
        ("", Some(buyer.as_str()), false),
        ("?promo_code=vipdeal", None, false),
        ("?promo_code=NOSUCH", None, false),
        ("?promo_code=crew-2026", None, true),
        ("", Some(admin.as_str()), true),
    ] {
        let listed = names(&app.get(&format!("{types_path}{query}"), token).await.json);
        let detail = names(&app.get(&format!("{event_path}{query}"), token).await.json["ticket_types"]);
        assert_eq!(listed.contains(&"Crew".to_owned()), crew_listed, "{query} {listed:?}");
        assert_eq!(detail, listed, "{query}");
    }
    let by_id = app.get(&format!("{types_path}/{crew}"), None).await;
    assert_eq!((by_id.status, &by_id.json["requires_promo_code"]), (200, &json!(true)));

    // Refused at accept without a code naming it, whatever the route.
    let crew_line = json!([{"ticket_type_id": crew, "quantity": 1}, {"ticket_type_id": vip, "quantity": 1}]);
    for code in [None, Some("VIPDEAL")] {
        let body = json!({"event_id": event, "items": crew_line, "promo_code": code});
        app.post("/api/v1/orders", &body, Some(&buyer)).await.assert_error(422, "promo_code_required");
        app.post("/api/v1/orders/quote", &body, Some(&buyer)).await.assert_error(422, "promo_code_required");
    }
    app.post(&format!("{event_path}/waitlist"), &json!({"ticket_type_id": crew, "quantity": 1}), Some(&buyer))
        .await
        .assert_error(422, "promo_code_required");
    let body =
        json!({"event_id": event, "items": [{"ticket_type_id": crew, "quantity": 2}], "promo_code": "crew-2026"});
    let crew_order = id_of(&app.post("/api/v1/orders", &body, Some(&buyer)).await);

    // A VIP order accepted before VIP came to require a code is refused by the worker.
    let vip_order = id_of(
        &app.post(
            "/api/v1/orders",
            &json!({"event_id": event, "items": [{"ticket_type_id": vip, "quantity": 1}]}),
            Some(&buyer),
        )
        .await,
    );
    let patched = app.patch(&format!("{types_path}/{vip}"), &json!({"requires_promo_code": true}), Some(&admin)).await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let _worker = app.worker().await;
    let refused = app.outcome(&buyer, vip_order).await;
    assert_eq!(
        (&refused["status"], &refused["reason"], &refused["reason_ticket_type_id"]),
        (&json!("REJECTED"), &json!("PROMO_CODE_REQUIRED"), &json!(vip))
    );
    let crew_order = app.outcome(&buyer, crew_order).await;
    assert_eq!((&crew_order["status"], &crew_order["reason"]), (&json!("PAID"), &json!("FREE_ORDER")));
    app.assert_consistent(event).await;
}

/// A waiting-list entry that carries a code is offered its tickets under it (priced and
/// counted like an order placed with it); an entry without one at the type's price.
#[tokio::test]
async fn a_waiting_list_entry_with_a_code_is_offered_under_it() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let buyers = app.buyers(3).await;
    let (first, coded, plain) = (&buyers[0].1, &buyers[1].1, &buyers[2].1);
    let event = app.event_with(&admin, 3, 4).await; // General at 49.90
    let code = add_code(&app, &admin, event, json!({"code": "WAIT50", "percent_off": 50, "max_uses": 2})).await;
    let held = app.pending_order(first, event, 3).await;

    let waitlist = format!("/api/v1/events/{event}/waitlist");
    let joined = app.post(&waitlist, &json!({"quantity": 1, "promo_code": "wait50"}), Some(coded)).await;
    assert_eq!((joined.status, &joined.json["promo_code"]), (201, &json!("WAIT50")), "{}", joined.body);
    app.post(&waitlist, &json!({"quantity": 1, "promo_code": "NOSUCH"}), Some(plain))
        .await
        .assert_error(422, "invalid_promo_code");
    let joined = app.post(&waitlist, &json!({"quantity": 1}), Some(plain)).await;
    assert_eq!((joined.status, &joined.json["promo_code"]), (201, &Value::Null), "{}", joined.body);

    // The hold is cancelled: both entries are offered a ticket, one under the code.
    assert_eq!(app.post(&format!("/api/v1/orders/{held}/cancel"), &json!({}), Some(first)).await.status, 200);
    let offers: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT w.user_id, w.order_id FROM waitlist_entries w WHERE w.event_id = $1 AND w.status = 'OFFERED'",
    )
    .bind(event)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(offers.len(), 2, "{offers:?}");
    let offer_of = |user: Uuid| offers.iter().find(|(u, _)| *u == user).map(|(_, order)| *order).expect("an offer");
    let under_code = app.outcome(coded, offer_of(buyers[1].0)).await;
    assert_eq!(
        (&under_code["status"], &under_code["reason"], &under_code["total"], &under_code["discount"]),
        (&json!("PENDING"), &json!("WAITLIST_OFFER"), &json!("24.95"), &json!("24.95"))
    );
    assert_eq!((&under_code["promo_code"], &under_code["items"][0]["list_price"]), (&json!("WAIT50"), &json!("49.90")));
    let at_price = app.outcome(plain, offer_of(buyers[2].0)).await;
    assert_eq!((&at_price["total"], &at_price["promo_code"]), (&json!("49.90"), &Value::Null));
    assert_eq!(uses(&app, code).await, 1);
    app.assert_consistent(event).await;
}
