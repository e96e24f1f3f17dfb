//! Ticket types, order lines and buyer caps end to end: admin CRUD with its refusals, orders
//! of several lines decided all or nothing against each type's stock and the venue cap,
//! stampedes with exact counts, one buyer against `max_per_buyer`, sale windows judged at
//! arrival, and releases giving back to the right type.

use std::collections::HashMap;
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

async fn add_type(app: &TestApp, admin: &str, event: Uuid, body: Value) -> Uuid {
    id_of(&app.post(&format!("/api/v1/events/{event}/ticket-types"), &body, Some(admin)).await)
}

async fn order_items(app: &TestApp, token: &str, event: Uuid, items: &[(Uuid, i64)]) -> Response {
    let items: Vec<Value> = items.iter().map(|(t, q)| json!({"ticket_type_id": t, "quantity": q})).collect();
    app.post("/api/v1/orders", &json!({"event_id": event, "items": items}), Some(token)).await
}

async fn type_sold(app: &TestApp, type_id: Uuid) -> i32 {
    sqlx::query_scalar("SELECT sold FROM ticket_types WHERE id = $1")
        .bind(type_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

/// (status, reason, reason_ticket_type_id) → orders.
async fn outcomes(app: &TestApp, event: Uuid) -> HashMap<(String, Option<String>, Option<Uuid>), i64> {
    let rows: Vec<(String, Option<String>, Option<Uuid>, i64)> = sqlx::query_as(
        "SELECT status, reason, reason_ticket_type_id, count(*) FROM orders WHERE event_id = $1 GROUP BY 1, 2, 3",
    )
    .bind(event)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(s, r, t, n)| ((s, r, t), n)).collect()
}

#[tokio::test]
async fn seed_shaped_events_get_a_default_type_and_admins_manage_types() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 4).await;

    // The seed's event has one type, General admission, at the event's price.
    let shown = app.get(&format!("/api/v1/events/{event}"), None).await.json;
    let types = shown["ticket_types"].as_array().expect("types listed");
    assert_eq!(types.len(), 1, "{shown}");
    let general: Uuid = types[0]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(shown["default_ticket_type_id"], json!(general));
    assert_eq!(
        (&types[0]["name"], &types[0]["price"], &types[0]["capacity"], &types[0]["tickets_available"]),
        (&json!("General admission"), &json!("49.90"), &Value::Null, &json!(100))
    );
    assert_eq!(types[0]["is_default"], true);

    // Admin CRUD.
    let path = format!("/api/v1/events/{event}/ticket-types");
    let vip_body = json!({"name": "VIP", "price": "199.00", "capacity": 10, "max_per_order": 2, "sort_order": 1});
    let created = app.post(&path, &vip_body, Some(&admin)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let vip = id_of(&created);
    assert_eq!(created.header("location"), Some(format!("{path}/{vip}").as_str()));
    assert_eq!((&created.json["tickets_available"], &created.json["is_default"]), (&json!(10), &json!(false)));
    let hidden = add_type(&app, &admin, event, json!({"name": "Crew", "price": 0, "hidden": true})).await;
    let listed = app.get(&path, None).await.json;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["General admission", "VIP"], "hidden types are not listed publicly");
    assert_eq!(app.get(&path, Some(&admin)).await.json.as_array().unwrap().len(), 3);
    assert_eq!(app.get(&format!("{path}/{hidden}"), None).await.json["name"], "Crew", "but shown by id");

    // Editing the default type's price edits the event's, and the other way round.
    let edited = app.patch(&format!("{path}/{general}"), &json!({"price": "59.00"}), Some(&admin)).await;
    assert_eq!(edited.json["price"], "59.00", "{}", edited.body);
    assert_eq!(app.get(&format!("/api/v1/events/{event}"), None).await.json["price"], "59.00");
    app.patch(&format!("/api/v1/events/{event}"), &json!({"price": "39.00"}), Some(&admin)).await;
    assert_eq!(app.get(&format!("{path}/{general}"), None).await.json["price"], "39.00");
    let quote = app.post("/api/v1/orders/quote", &json!({"event_id": event, "quantity": 2}), Some(&buyer)).await;
    assert_eq!((&quote.json["total"], &quote.json["unit_price"]), (&json!("78.00"), &json!("39.00")), "{}", quote.body);
    let mixed = json!({"event_id": event, "items": [{"ticket_type_id": vip, "quantity": 1},
                                                    {"ticket_type_id": general, "quantity": 2}]});
    let quote = app.post("/api/v1/orders/quote", &mixed, Some(&buyer)).await;
    assert_eq!((&quote.json["total"], &quote.json["unit_price"]), (&json!("277.00"), &Value::Null), "{}", quote.body);
    assert_eq!(quote.json["items"][0]["name"], "VIP");

    // Refusals.
    app.post(&path, &vip_body, Some(&buyer)).await.assert_error(403, "forbidden");
    app.post(&path, &vip_body, None).await.assert_error(401, "unauthorized");
    app.post(&format!("/api/v1/events/{}/ticket-types", Uuid::now_v7()), &vip_body, Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.get(&format!("{path}/{}", Uuid::now_v7()), None).await.assert_error(404, "not_found");
    for bad in [
        json!({"name": "", "price": 1}),
        json!({"name": "X", "price": "-1"}),
        json!({"name": "X", "price": "1.001"}),
        json!({"name": "X", "price": 1, "capacity": -1}),
        json!({"name": "X", "price": 1, "capacity": 10_000_001}),
        json!({"name": "X", "price": 1, "max_per_order": 0}),
        json!({"name": "X", "price": 1, "max_per_buyer": 0}),
        json!({"name": "X", "price": 1, "sort_order": 2_000_000}),
        json!({"name": "X", "price": 1, "sales_start": "2031-01-02T00:00:00Z", "sales_end": "2031-01-01T00:00:00Z"}),
    ] {
        app.post(&path, &bad, Some(&admin)).await.assert_error(422, "validation_failed");
    }
    app.post(&path, &json!({"name": "X", "price": 1, "colour": "red"}), Some(&admin))
        .await
        .assert_error(422, "invalid_body");
    app.patch(&format!("{path}/{vip}"), &json!({"capacity": 0, "bogus": 1}), Some(&admin))
        .await
        .assert_error(422, "invalid_body");
    app.patch(&format!("{path}/{vip}"), &json!({"name": "VIP"}), Some(&buyer)).await.assert_error(403, "forbidden");

    // A type with tickets cannot shrink below them nor be withdrawn; one without can.
    let _worker = app.worker().await;
    let order = id_of(&order_items(&app, &buyer, event, &[(vip, 2)]).await);
    assert_eq!(app.outcome(&buyer, order).await["status"], "PENDING");
    app.patch(&format!("{path}/{vip}"), &json!({"capacity": 1}), Some(&admin))
        .await
        .assert_error(409, "capacity_below_sold");
    app.delete(&format!("{path}/{vip}"), Some(&admin)).await.assert_error(409, "ticket_type_has_tickets");
    assert_eq!(app.patch(&format!("{path}/{vip}"), &json!({"capacity": 2}), Some(&admin)).await.status, 200);
    assert_eq!(app.delete(&format!("{path}/{hidden}"), Some(&admin)).await.status, 204);
    app.delete(&format!("{path}/{hidden}"), Some(&admin)).await.assert_error(404, "not_found");
    order_items(&app, &buyer, event, &[(hidden, 1)]).await.assert_error(422, "unknown_ticket_type");

    // Withdrawing the default type: the seed's shape has nothing to buy, lines still work.
    assert_eq!(app.delete(&format!("{path}/{general}"), Some(&admin)).await.status, 204);
    app.order(&buyer, event, 1, None).await.assert_error(422, "ticket_type_required");
    assert_eq!(app.get(&format!("/api/v1/events/{event}"), None).await.json["default_ticket_type_id"], Value::Null);

    // At most 50 types on sale.
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM ticket_types WHERE event_id = $1 AND deleted_at IS NULL")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    for i in live..50 {
        add_type(&app, &admin, event, json!({"name": format!("Tier {i}"), "price": 1})).await;
    }
    app.post(&path, &json!({"name": "One too many", "price": 1}), Some(&admin))
        .await
        .assert_error(409, "too_many_ticket_types");
}

#[tokio::test]
async fn order_lines_are_checked_before_anything_is_stored() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 6).await;
    let other_event = app.event_with(&admin, 100, 6).await;
    let vip = add_type(&app, &admin, event, json!({"name": "VIP", "price": 100, "max_per_order": 2})).await;
    let capped = add_type(&app, &admin, event, json!({"name": "Capped", "price": 1, "max_per_buyer": 3})).await;
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let later = add_type(&app, &admin, event, json!({"name": "Later", "price": 1, "sales_start": soon})).await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let over = add_type(&app, &admin, event, json!({"name": "Over", "price": 1, "sales_end": past})).await;
    let foreign = add_type(&app, &admin, other_event, json!({"name": "Elsewhere", "price": 1})).await;

    let post = |body: Value| {
        let (app, buyer) = (&app, buyer.clone());
        async move { app.post("/api/v1/orders", &body, Some(&buyer)).await }
    };
    let line = |t: Uuid, q: i64| json!({"ticket_type_id": t, "quantity": q});
    post(json!({"event_id": event, "quantity": 1, "items": [line(vip, 1)]})).await.assert_error(422, "invalid_body");
    post(json!({"event_id": event, "items": []})).await.assert_error(422, "invalid_items");
    post(json!({"event_id": event, "items": [line(vip, 1), line(vip, 1)]})).await.assert_error(422, "invalid_items");
    let many: Vec<Value> = (0..21).map(|_| line(Uuid::now_v7(), 1)).collect();
    post(json!({"event_id": event, "items": many})).await.assert_error(422, "invalid_items");
    post(json!({"event_id": event, "items": [line(vip, 0)]})).await.assert_error(422, "invalid_quantity");
    post(json!({"event_id": event, "items": [line(vip, 3)]})).await.assert_error(422, "invalid_quantity");
    post(json!({"event_id": event, "items": [line(capped, 4)]})).await.assert_error(422, "invalid_quantity");
    post(json!({"event_id": event, "items": [line(vip, 2), line(capped, 3), line(over, 1)]}))
        .await
        .assert_error(422, "not_on_sale");
    post(json!({"event_id": event, "items": [line(vip, 2), line(capped, 3)], "x": 1}))
        .await
        .assert_error(422, "invalid_body");
    post(json!({"event_id": event, "items": [line(foreign, 1)]})).await.assert_error(422, "unknown_ticket_type");
    post(json!({"event_id": event, "items": [{"ticket_type_id": "nope", "quantity": 1}]}))
        .await
        .assert_error(422, "invalid_body");
    let early = post(json!({"event_id": event, "items": [line(later, 1)]})).await;
    early.assert_error(422, "not_on_sale");
    assert!(early.json["error"]["message"].as_str().unwrap().contains("Later is on sale from"), "{}", early.body);
    // 2 + 3 + 2 = 7 > the event's max_per_order of 6.
    let general: Uuid = app.get(&format!("/api/v1/events/{event}"), None).await.json["default_ticket_type_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    post(json!({"event_id": event, "items": [line(vip, 2), line(capped, 3), line(general, 2)]}))
        .await
        .assert_error(422, "invalid_quantity");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(orders, 0, "refused orders store nothing");

    // A good one, replayed with its key: the same lines in another order are the same request.
    let body = json!({"event_id": event, "items": [line(vip, 2), line(capped, 1)]});
    let send = |body: &Value, key: &str| {
        app.client.post(app.url("/api/v1/orders")).bearer_auth(&buyer).header("idempotency-key", key).json(body).send()
    };
    let first = Response::from(send(&body, "k1").await.unwrap()).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!((&first.json["quantity"], &first.json["total"]), (&json!(3), &json!("201.00")));
    assert_eq!(first.json["items"].as_array().unwrap().len(), 2);
    let swapped = json!({"event_id": event, "items": [line(capped, 1), line(vip, 2)]});
    let again = Response::from(send(&swapped, "k1").await.unwrap()).await;
    assert_eq!((again.status, &again.json["id"]), (202, &first.json["id"]));
    let other = json!({"event_id": event, "items": [line(vip, 1), line(capped, 1)]});
    Response::from(send(&other, "k1").await.unwrap()).await.assert_error(422, "idempotency_key_reused");
}

/// Two capped types under a venue cap smaller than their sum: 200 one-ticket orders over
/// both, at once. The venue sells out exactly; neither type passes its own capacity.
#[tokio::test]
async fn a_stampede_over_two_types_stops_at_the_venue_cap() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(|c| c.batch_size = 32).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 60, 4).await;
    let a = add_type(&app, &admin, event, json!({"name": "Floor", "price": 50, "capacity": 40})).await;
    let b = add_type(&app, &admin, event, json!({"name": "Seated", "price": 70, "capacity": 40})).await;
    let buyers = app.buyers(200).await;
    // Buyers 0..150 want Floor (more than its 40), the rest Seated.
    let app_ref = &app;
    let responses = join_all(buyers.iter().enumerate().map(|(i, (_, token))| async move {
        let wanted = if i < 150 { a } else { b };
        order_items(app_ref, token, event, &[(wanted, 1)]).await
    }))
    .await;
    assert!(responses.iter().all(|r| r.status == 202), "every order accepted");
    app.wait_until_final(SETTLE).await;

    let (floor, seated) = (type_sold(&app, a).await, type_sold(&app, b).await);
    assert_eq!(app.assert_consistent(event).await, (60, 60), "the venue sells out exactly");
    assert!(floor <= 40 && seated <= 40, "floor {floor}, seated {seated}");
    assert_eq!(floor + seated, 60);
    let counts = outcomes(&app, event).await;
    assert_eq!(counts.get(&("PENDING".into(), None, None)), Some(&60), "{counts:?}");
    let rejected: i64 = counts.iter().filter(|((s, ..), _)| s == "REJECTED").map(|(_, n)| n).sum();
    assert_eq!(rejected, 140, "{counts:?}");
    for (status, reason, about) in counts.keys().filter(|(s, ..)| s == "REJECTED") {
        match reason.as_deref() {
            Some("SOLD_OUT") => assert!(*about == Some(a) || *about == Some(b), "{status} {about:?}"),
            Some("VENUE_FULL") => assert_eq!(*about, None),
            other => panic!("unexpected reason {other:?}"),
        }
    }
    // 150 wanted Floor: at least 110 of them were refused.
    let floor_refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'REJECTED' AND lines->0->>'ticket_type_id' = $2",
    )
    .bind(event)
    .bind(a.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(floor_refused, 150 - i64::from(floor));
}

/// One buyer's 20 concurrent two-ticket orders against `max_per_buyer` 4: exactly 4 tickets.
/// (Of one-ticket orders, 3 would be held: a capped event takes at most 3 unpaid orders per
/// buyer, `abuse.rs`.)
#[tokio::test]
async fn one_buyer_cannot_pass_the_cap_with_concurrent_orders() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(|c| c.batch_size = 4).await;
    let admin = app.admin().await;
    let res = app.create_event(&admin, json!({"capacity": 100, "max_per_buyer": 4})).await;
    let event = id_of(&res);
    assert_eq!(res.json["max_per_buyer"], 4);
    let buyers = app.buyers(3).await;
    let (scalper, fan, newcomer) = (&buyers[0].1, &buyers[1].1, &buyers[2].1);

    let responses = join_all((0..20).map(|_| app.order(scalper, event, 2, None))).await;
    assert!(responses.iter().all(|r| r.status == 202));
    app.order(scalper, event, 5, None).await.assert_error(422, "invalid_quantity");
    app.wait_until_final(SETTLE).await;
    let counts = outcomes(&app, event).await;
    assert_eq!(counts.get(&("PENDING".into(), None, None)), Some(&2), "{counts:?}");
    assert_eq!(counts.get(&("REJECTED".into(), Some("BUYER_LIMIT".into()), None)), Some(&18), "{counts:?}");
    assert_eq!(app.assert_consistent(event).await, (100, 4));

    // Another buyer is not affected; a released hold makes room again.
    let fans = id_of(&app.order(fan, event, 4, None).await);
    assert_eq!(app.outcome(fan, fans).await["status"], "PENDING");
    let held: Uuid =
        sqlx::query_scalar("SELECT id FROM orders WHERE event_id = $1 AND status = 'PENDING' AND user_id = $2 LIMIT 1")
            .bind(event)
            .bind(buyers[0].0)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(app.post(&format!("/api/v1/orders/{held}/cancel"), &json!({}), Some(scalper)).await.status, 200);
    let again = id_of(&app.order(scalper, event, 2, None).await);
    assert_eq!(app.outcome(scalper, again).await["status"], "PENDING");
    let too_many = id_of(&app.order(scalper, event, 1, None).await);
    let refused = app.outcome(scalper, too_many).await;
    assert_eq!((&refused["status"], &refused["reason"]), (&json!("REJECTED"), &json!("BUYER_LIMIT")));
    assert_eq!(app.assert_consistent(event).await, (100, 8));

    // A cap on a type counts that type only (the event's cap of 4 still counts them all).
    let vip = add_type(&app, &admin, event, json!({"name": "VIP", "price": 1, "max_per_buyer": 1})).await;
    let first = id_of(&order_items(&app, newcomer, event, &[(vip, 1)]).await);
    let second = id_of(&order_items(&app, newcomer, event, &[(vip, 1)]).await);
    let general = id_of(&app.order(newcomer, event, 3, None).await);
    let over = id_of(&app.order(newcomer, event, 1, None).await);
    assert_eq!(app.outcome(newcomer, first).await["status"], "PENDING");
    assert_eq!(app.outcome(newcomer, general).await["status"], "PENDING");
    let refused = app.outcome(newcomer, over).await;
    assert_eq!((&refused["reason"], &refused["reason_ticket_type_id"]), (&json!("BUYER_LIMIT"), &Value::Null));
    assert_eq!(app.outcome(fan, fans).await["status"], "PENDING");
    let refused = app.outcome(newcomer, second).await;
    assert_eq!((&refused["reason"], &refused["reason_ticket_type_id"]), (&json!("BUYER_LIMIT"), &json!(vip)));
}

/// A line that does not fit rejects its whole order (nothing of the other lines is taken),
/// and later smaller orders still fit; releases give back to the type they came from.
#[tokio::test]
async fn multi_line_orders_are_all_or_nothing_and_releases_return_per_type() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let worker = app.worker_with(|c| (c.hold_ttl_secs, c.expiry_interval_ms) = (3, 3_600_000)).await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 10, 10).await;
    let general: Uuid = app.get(&format!("/api/v1/events/{event}"), None).await.json["default_ticket_type_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let vip = add_type(&app, &admin, event, json!({"name": "VIP", "price": 100, "capacity": 2})).await;

    let first = id_of(&order_items(&app, &buyer, event, &[(vip, 1), (general, 2)]).await);
    let first = app.outcome(&buyer, first).await;
    assert_eq!((&first["status"], &first["total"]), (&json!("PENDING"), &json!("199.80")), "{first}");
    let tickets: Vec<&Value> = first["tickets"].as_array().unwrap().iter().collect();
    assert_eq!(tickets.iter().filter(|t| t["ticket_type_id"] == json!(vip)).count(), 1);
    assert_eq!(tickets.iter().filter(|t| t["ticket_type_id"] == json!(general)).count(), 2);

    let too_big = id_of(&order_items(&app, &buyer, event, &[(general, 1), (vip, 2)]).await);
    let too_big = app.outcome(&buyer, too_big).await;
    assert_eq!(
        (&too_big["status"], &too_big["reason"], &too_big["reason_ticket_type_id"]),
        (&json!("REJECTED"), &json!("SOLD_OUT"), &json!(vip))
    );
    assert_eq!((type_sold(&app, vip).await, type_sold(&app, general).await), (1, 2), "nothing taken");
    let smaller = id_of(&order_items(&app, &buyer, event, &[(vip, 1), (general, 6)]).await);
    assert_eq!(app.outcome(&buyer, smaller).await["status"], "PENDING");
    assert_eq!(app.assert_consistent(event).await, (10, 10));

    // The venue is full: a General order is sold out (General has no stock of its own); a
    // VIP order would be VIP's own refusal first (VIP is also out).
    let full = id_of(&app.order(&buyer, event, 1, None).await);
    let full = app.outcome(&buyer, full).await;
    assert_eq!((&full["reason"], &full["reason_ticket_type_id"]), (&json!("SOLD_OUT"), &json!(general)));
    // Raising VIP's stock does not raise the venue: VENUE_FULL.
    app.patch(&format!("/api/v1/events/{event}/ticket-types/{vip}"), &json!({"capacity": 5}), Some(&admin)).await;
    let venue = id_of(&order_items(&app, &buyer, event, &[(vip, 1)]).await);
    let venue = app.outcome(&buyer, venue).await;
    assert_eq!((&venue["reason"], &venue["reason_ticket_type_id"]), (&json!("VENUE_FULL"), &Value::Null));

    // Cancelling gives back to each type what it took; expiry too.
    let first_id = first["id"].as_str().unwrap();
    assert_eq!(app.post(&format!("/api/v1/orders/{first_id}/cancel"), &json!({}), Some(&buyer)).await.status, 200);
    assert_eq!((type_sold(&app, vip).await, type_sold(&app, general).await), (1, 6));
    app.assert_consistent(event).await;
    // The other hold runs out; the expiry loop (an hour apart here) is stepped past it.
    app.wait_past_holds(event).await;
    assert!(worker.steps().expiry().await);
    let expired: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'EXPIRED'")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(expired, 1, "the other hold expired");
    assert_eq!((type_sold(&app, vip).await, type_sold(&app, general).await), (0, 0));
    assert_eq!(app.assert_consistent(event).await, (10, 0));
}

/// Sale windows: the api refuses orders outside them; the worker judges an order by when
/// the api accepted it, so a window moved after orders queued refuses those that arrived
/// outside it and keeps those that arrived inside.
#[tokio::test]
async fn sale_windows_are_judged_by_arrival() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let admin = app.admin().await;
    let (_, buyer) = app.user("Buyer").await;
    let event = app.event_with(&admin, 100, 4).await;
    let path = format!("/api/v1/events/{event}/ticket-types");
    let end = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let presale = add_type(&app, &admin, event, json!({"name": "Presale", "price": 20, "sales_end": end})).await;

    // No worker yet: both orders stay QUEUED.
    let early = order_items(&app, &buyer, event, &[(presale, 1)]).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let late = order_items(&app, &buyer, event, &[(presale, 1)]).await;
    assert_eq!((early.status, late.status), (202, 202), "{} {}", early.body, late.body);
    let (early, late) = (early.json, late.json);
    let early_at: chrono::DateTime<chrono::Utc> = early["created_at"].as_str().unwrap().parse().unwrap();
    // The presale ends between the two arrivals.
    let cut = early_at + chrono::Duration::milliseconds(500);
    let patched = app.patch(&format!("{path}/{presale}"), &json!({"sales_end": cut}), Some(&admin)).await;
    assert_eq!((patched.status, &patched.json["on_sale"]), (200, &json!(false)), "{}", patched.body);
    order_items(&app, &buyer, event, &[(presale, 1)]).await.assert_error(422, "not_on_sale");

    let _worker = app.worker().await;
    let early = app.outcome(&buyer, early["id"].as_str().unwrap().parse().unwrap()).await;
    let late = app.outcome(&buyer, late["id"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!(early["status"], "PENDING", "arrived in time: {early}");
    assert_eq!(
        (&late["status"], &late["reason"], &late["reason_ticket_type_id"]),
        (&json!("REJECTED"), &json!("NOT_ON_SALE"), &json!(presale))
    );

    // The window's start edge: on sale from `sales_start` exactly.
    let start = chrono::Utc::now() + chrono::Duration::seconds(2);
    let body = json!({"name": "Door", "price": 30, "sales_start": start});
    let door = add_type(&app, &admin, event, body).await;
    order_items(&app, &buyer, event, &[(door, 1)]).await.assert_error(422, "not_on_sale");
    let wait = (start - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let opened = id_of(&order_items(&app, &buyer, event, &[(door, 1)]).await);
    assert_eq!(app.outcome(&buyer, opened).await["status"], "PENDING");
    app.assert_consistent(event).await;
}

/// Migration 0012 on a database holding orders and tickets: each existing event gets one
/// default type that has sold what the event sold, every ticket carries it, and every order
/// gets the one line it stood for.
#[tokio::test]
async fn existing_events_move_to_one_default_type_with_their_sales() {
    use sqlx::AssertSqlSafe;
    let db = tests::TestDb::empty(&tests::Services::from_env()).await;
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(tests::workspace_root().join("migrations"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let apply = |files: Vec<std::path::PathBuf>| {
        let pool = db.pool.clone();
        async move {
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap();
                sqlx::raw_sql(AssertSqlSafe(text)).execute(&pool).await.unwrap_or_else(|e| panic!("{file:?}: {e}"));
            }
        }
    };
    let (before, after): (Vec<_>, Vec<_>) =
        files.into_iter().partition(|f| f.file_name().unwrap().to_str().unwrap() < "0012");
    apply(before).await;

    // As the previous version left things: an event with a paid order (2 tickets), a held
    // one (1), a cancelled one (its ticket cancelled), a rejected and a queued one; a second
    // event with nothing sold.
    let (user, event, empty) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO users (id, email, name, password_hash) VALUES ('{user}', 'old@example.com', 'Old', 'x');
         INSERT INTO events (id, name, location, organization, starts_at, capacity, sold, price)
         VALUES ('{event}', 'Old show', 'Hall', 'Org', now() + interval '30 days', 10, 3, 25.50),
                ('{empty}', 'Quiet show', 'Hall', 'Org', now() + interval '30 days', 5, 0, 0);"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut orders = Vec::new();
    for (status, quantity, live_tickets, cancelled_tickets) in
        [("PAID", 2, 2, 0), ("PENDING", 1, 1, 0), ("CANCELLED", 1, 0, 1), ("REJECTED", 3, 0, 0), ("QUEUED", 1, 0, 0)]
    {
        let order = Uuid::now_v7();
        orders.push((order, quantity));
        sqlx::query(
            "INSERT INTO orders (id, user_id, event_id, quantity, unit_price, total, status)
             VALUES ($1, $2, $3, $4, 25.50, 25.50 * $4, $5)",
        )
        .bind(order)
        .bind(user)
        .bind(event)
        .bind(quantity)
        .bind(status)
        .execute(&db.pool)
        .await
        .unwrap();
        for (count, ticket_status) in [(live_tickets, "ACTIVE"), (cancelled_tickets, "CANCELLED")] {
            for _ in 0..count {
                sqlx::query("INSERT INTO tickets (id, order_id, event_id, status) VALUES ($1, $2, $3, $4)")
                    .bind(Uuid::now_v7())
                    .bind(order)
                    .bind(event)
                    .bind(ticket_status)
                    .execute(&db.pool)
                    .await
                    .unwrap();
            }
        }
    }

    apply(after).await;

    let types: Vec<(Uuid, Uuid, String, rust_decimal::Decimal, Option<i32>, i32)> =
        sqlx::query_as("SELECT id, event_id, name, price, capacity, sold FROM ticket_types ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(types.len(), 2, "one type per event: {types:?}");
    let (general, _, name, price, capacity, sold) = types.iter().find(|t| t.1 == event).unwrap().clone();
    assert_eq!((name.as_str(), price, capacity, sold), ("General admission", "25.50".parse().unwrap(), None, 3));
    assert_eq!(types.iter().find(|t| t.1 == empty).unwrap().5, 0);
    let default: Option<Uuid> = sqlx::query_scalar("SELECT default_ticket_type_id FROM events WHERE id = $1")
        .bind(event)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(default, Some(general));
    let untyped: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets WHERE ticket_type_id IS DISTINCT FROM $1")
        .bind(general)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(untyped, 0, "every ticket carries the default type");
    for (order, quantity) in orders {
        let lines: sqlx::types::Json<Vec<common::domain::OrderLine>> =
            sqlx::query_scalar("SELECT lines FROM orders WHERE id = $1").bind(order).fetch_one(&db.pool).await.unwrap();
        let expected = common::domain::OrderLine {
            ticket_type_id: general,
            name: "General admission".into(),
            quantity,
            unit_price: "25.50".parse().unwrap(),
            list_price: None,
        };
        assert_eq!(lines.0, [expected]);
    }
    // An event inserted after the migration, by any writer, gets its default type too.
    let later = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (id, name, location, organization, starts_at, capacity, price)
         VALUES ($1, 'New show', 'Hall', 'Org', now() + interval '30 days', 10, 9)",
    )
    .bind(later)
    .execute(&db.pool)
    .await
    .unwrap();
    let (name, price): (String, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT t.name, t.price FROM ticket_types t JOIN events e ON e.default_ticket_type_id = t.id WHERE e.id = $1",
    )
    .bind(later)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((name.as_str(), price), ("General admission", rust_decimal::Decimal::from(9)));
}
