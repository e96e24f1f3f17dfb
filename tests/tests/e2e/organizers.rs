//! What an organizer needs on day one: free orders that need no payment, an event's orders
//! and attendees (JSON pages and CSV exports), door staff who may scan tickets and nothing
//! else, and a currency on every price.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tests::TestApp;
use uuid::Uuid;

fn id_of(res: &tests::Response) -> Uuid {
    res.json["id"].as_str().expect("id").parse().expect("uuid")
}

/// Waits (long-polling) until the order is no longer `QUEUED` and returns it.
async fn decided(app: &TestApp, token: &str, order: Uuid) -> Value {
    let res = app.get(&format!("/api/v1/orders/{order}?wait=30&status=QUEUED"), Some(token)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    res.json
}

#[tokio::test]
async fn free_orders_are_paid_when_their_tickets_are_allocated() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let connection = app.broker.connect().await;
    let mut consumer = tests::bind_order_events(&connection, "order.paid").await;

    let admin = app.admin().await;
    let free = app.create_event(&admin, json!({"price": "0", "capacity": 3})).await;
    assert_eq!(free.status, 201, "{}", free.body);
    let free = id_of(&free);
    let paid_event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let buyer = buyers[0].1.as_str();

    let res = app.order(buyer, free, 2, None).await;
    assert_eq!(res.status, 202, "{}", res.body);
    let order = decided(&app, buyer, id_of(&res)).await;
    assert_eq!((order["status"].as_str(), order["reason"].as_str()), (Some("PAID"), Some("FREE_ORDER")), "{order}");
    assert_eq!(order["total"], "0.00");
    assert!(order["expires_at"].is_null(), "no hold to expire: {order}");
    let history: Vec<(&str, Option<&str>)> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["status"].as_str().unwrap(), h["reason"].as_str()))
        .collect();
    assert_eq!(history, [("QUEUED", None), ("PAID", Some("FREE_ORDER"))]);
    let tickets = order["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 2);
    assert!(tickets.iter().all(|t| t["code"].is_string()), "paid tickets carry their codes: {order}");

    // The order event says it too.
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("order.paid within 30 s")
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    let event = &body["events"][0];
    assert_eq!(event["type"], "order.paid", "{body}");
    assert_eq!(event["data"]["reason"], "FREE_ORDER", "{body}");
    assert_eq!(event["data"]["currency"], "EUR", "{body}");

    // Capacity still rules: one ticket left, so two more are refused; a paid event's order
    // still waits for its payment.
    let second = app.order(&buyers[1].1, free, 2, None).await;
    if second.status == 202 {
        let second = decided(&app, &buyers[1].1, id_of(&second)).await;
        assert_eq!((second["status"].as_str(), second["reason"].as_str()), (Some("REJECTED"), Some("SOLD_OUT")));
    } else {
        second.assert_error(409, "sold_out");
    }
    let pending = app.pending_order(buyer, paid_event, 1).await;
    let pending = app.get(&format!("/api/v1/orders/{pending}"), Some(buyer)).await;
    assert!(pending.json["reason"].is_null() && pending.json["expires_at"].is_string(), "{}", pending.body);
    // A payment webhook for the free order changes nothing.
    assert_eq!(app.payment(id_of(&res), &json!({"status": "PAID"})).await.status, 204);
    app.assert_consistent(free).await;
    app.assert_consistent(paid_event).await;
}

#[tokio::test]
async fn prices_carry_an_iso_currency() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;

    let euros = app.create_event(&admin, json!({})).await;
    assert_eq!(euros.json["currency"], "EUR", "the default: {}", euros.body);
    let yen = app.create_event(&admin, json!({"currency": "JPY", "price": 4500})).await;
    assert_eq!(yen.status, 201, "{}", yen.body);
    assert_eq!((yen.json["currency"].as_str(), yen.json["price"].as_str()), (Some("JPY"), Some("4500.00")));

    for (currency, price) in
        [(json!("usd"), json!("10")), (json!("EURO"), json!("10")), (json!("XAU"), json!("10")), (json!(5), json!("1"))]
    {
        let res = app.create_event(&admin, json!({"currency": currency, "price": price})).await;
        assert_eq!(res.status, 422, "{currency}: {}", res.body);
    }
    let res = app.create_event(&admin, json!({"currency": "JPY", "price": "4500.50"})).await;
    res.assert_error(422, "validation_failed");
    assert!(res.json["error"]["message"].as_str().unwrap().contains("JPY"), "{}", res.body);

    // An order keeps the currency it was placed in; the quote and the lists say it.
    let event = id_of(&euros);
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let quote = app.post("/api/v1/orders/quote", &json!({"event_id": event, "quantity": 1}), Some(buyer)).await;
    assert_eq!((quote.json["total"].as_str(), quote.json["currency"].as_str()), (Some("49.90"), Some("EUR")));
    let order = app.pending_order(buyer, event, 1).await;
    let edit = app.patch(&format!("/api/v1/events/{event}"), &json!({"currency": "USD"}), Some(&admin)).await;
    assert_eq!(edit.json["currency"], "USD", "{}", edit.body);
    app.patch(&format!("/api/v1/events/{event}"), &json!({"currency": "dollars"}), Some(&admin))
        .await
        .assert_error(422, "validation_failed");
    let res = app.get(&format!("/api/v1/orders/{order}"), Some(buyer)).await;
    assert_eq!(res.json["currency"], "EUR", "{}", res.body);
    let listed = app.get("/api/v1/orders", Some(buyer)).await;
    assert_eq!(listed.json[0]["currency"], "EUR", "{}", listed.body);
    let later = app.order(buyer, event, 1, None).await;
    assert_eq!(later.json["currency"], "USD", "{}", later.body);
}

/// A user promoted to `staff` by an admin: (id, token after logging in again).
async fn door_staff(app: &TestApp, admin: &str) -> (Uuid, String) {
    let (id, email) = app.signup("Door").await;
    let res = app.patch(&format!("/api/v1/users/{id}/role"), &json!({"role": "staff"}), Some(admin)).await;
    assert_eq!((res.status, res.json["role"].as_str()), (200, Some("staff")), "{}", res.body);
    (id, app.token_for(&email).await)
}

#[tokio::test]
async fn door_staff_check_tickets_in_and_nothing_else() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let (staff_id, staff) = door_staff(&app, &admin).await;
    let buyers = app.buyers(1).await;
    let buyer = buyers[0].1.as_str();
    let order = app.pending_order(buyer, event, 2).await;
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    let res = app.get(&format!("/api/v1/orders/{order}"), Some(buyer)).await;
    let code = res.json["tickets"][0]["code"].as_str().unwrap().to_owned();

    let scan = app.post("/api/v1/check-ins", &json!({"code": code}), Some(&staff)).await;
    assert_eq!(scan.status, 200, "{}", scan.body);
    let by: Uuid = sqlx::query_scalar("SELECT checked_in_by FROM check_ins").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(by, staff_id);
    app.post("/api/v1/check-ins", &json!({"code": code}), Some(&staff)).await.assert_error(409, "already_checked_in");
    // A plain user still may not scan, and is told who may.
    let refused = app.post("/api/v1/check-ins", &json!({"code": code}), Some(buyer)).await;
    refused.assert_error(403, "forbidden");
    assert_eq!(refused.json["error"]["message"], "this action requires the staff or admin role");

    // Nothing an admin may do.
    let forbidden = [
        app.create_event(&staff, json!({})).await,
        app.patch(&format!("/api/v1/events/{event}"), &json!({"capacity": 20}), Some(&staff)).await,
        app.delete(&format!("/api/v1/events/{event}"), Some(&staff)).await,
        app.get("/api/v1/users", Some(&staff)).await,
        app.patch(&format!("/api/v1/users/{staff_id}/role"), &json!({"role": "admin"}), Some(&staff)).await,
        app.get(&format!("/api/v1/events/{event}/orders"), Some(&staff)).await,
        app.get(&format!("/api/v1/events/{event}/attendees"), Some(&staff)).await,
        app.get("/api/v1/late-payments", Some(&staff)).await,
    ];
    for res in forbidden {
        res.assert_error(403, "forbidden");
        assert_eq!(res.json["error"]["message"], "this action requires the admin role");
    }
    // Staff are users otherwise: their own account and purchases.
    assert_eq!(app.get("/api/v1/me", Some(&staff)).await.json["role"], "staff");
    assert_eq!(app.order(&staff, event, 1, None).await.status, 202);

    // The only admin cannot step down to staff either.
    let me = app.get("/api/v1/me", Some(&admin)).await;
    let admin_id = me.json["id"].as_str().unwrap();
    app.patch(&format!("/api/v1/users/{admin_id}/role"), &json!({"role": "staff"}), Some(&admin))
        .await
        .assert_error(409, "last_admin");
    // Back to user: the staff token stops working at once (its role changed).
    let res = app.patch(&format!("/api/v1/users/{staff_id}/role"), &json!({"role": "user"}), Some(&admin)).await;
    assert_eq!(res.status, 200);
    assert_eq!(app.get("/api/v1/me", Some(&staff)).await.status, 401);
}

/// `GET path` with an `Accept` header; returns (status, content type, body).
async fn get_accept(app: &TestApp, path: &str, token: &str, accept: &str) -> (u16, String, String) {
    let res = app.client.get(app.url(path)).bearer_auth(token).header("accept", accept).send().await.unwrap();
    let status = res.status().as_u16();
    let content_type = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, content_type, res.text().await.unwrap())
}

#[tokio::test]
async fn admins_list_and_export_an_events_orders_and_attendees() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 100, 4).await;
    let other_event = app.event_with(&admin, 100, 4).await;
    let buyers = app.buyers(3).await;
    // A buyer whose name a spreadsheet would run as a formula.
    sqlx::query("UPDATE users SET name = '=HYPERLINK(\"http://x\")' WHERE id = $1")
        .bind(buyers[2].0)
        .execute(&app.db.pool)
        .await
        .unwrap();

    // Five orders: three paid (2 + 1 + 3 tickets), one pending, one cancelled; one elsewhere.
    let mut paid = Vec::new();
    for (buyer, quantity) in [(0, 2), (1, 1), (2, 3)] {
        let order = app.pending_order(&buyers[buyer].1, event, quantity).await;
        assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
        paid.push(order);
    }
    let pending = app.pending_order(&buyers[0].1, event, 1).await;
    let cancelled = app.pending_order(&buyers[1].1, event, 1).await;
    assert_eq!(
        app.post(&format!("/api/v1/orders/{cancelled}/cancel"), &json!({}), Some(&buyers[1].1)).await.status,
        200
    );
    app.pending_order(&buyers[0].1, other_event, 1).await;

    let path = format!("/api/v1/events/{event}/orders");
    let all = app.get(&path, Some(&admin)).await;
    assert_eq!(all.status, 200, "{}", all.body);
    let ids: Vec<&str> = all.json.as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "this event's orders only: {}", all.body);
    assert_eq!(ids[0], cancelled.to_string(), "newest first");
    assert_eq!(all.json[0]["buyer_email"], format!("buyer-{}@example.com", buyers[1].0.simple()));
    assert_eq!(all.json[0]["currency"], "EUR");

    // Filtered by status, paginated: the next page keeps the filter.
    let page = app.get(&format!("{path}?status=PAID&limit=2"), Some(&admin)).await;
    assert_eq!(page.json.as_array().unwrap().len(), 2);
    let link = page.header("link").expect("a next page").to_owned();
    assert!(link.contains("status=PAID") && link.contains("cursor="), "{link}");
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let rest = app.get(next, Some(&admin)).await;
    assert_eq!(rest.json.as_array().unwrap().len(), 1, "{}", rest.body);
    assert_eq!(rest.json[0]["id"], paid[0].to_string());
    assert!(rest.header("link").is_none());
    let two = app.get(&format!("{path}?status=PENDING,CANCELLED"), Some(&admin)).await;
    let statuses: Vec<&str> = two.json.as_array().unwrap().iter().map(|o| o["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["CANCELLED", "PENDING"]);
    assert_eq!(two.json[1]["id"], pending.to_string());

    // CSV: every matching row, by `format` or by `Accept`.
    let (status, content_type, csv) = get_accept(&app, &format!("{path}?status=PAID"), &admin, "text/csv").await;
    assert_eq!((status, content_type.as_str()), (200, "text/csv; charset=utf-8"), "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "id,user_id,buyer_name,buyer_email,quantity,unit_price,total,currency,promo_code,discount,status,reason,created_at,updated_at,\
         expires_at"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[1].starts_with(&format!("{},{},\"'=HYPERLINK(", paid[2], buyers[2].0)), "defused: {}", lines[1]);
    assert!(lines[1].contains(",3,49.90,149.70,EUR,,0.00,PAID,,"), "{}", lines[1]);
    let (_, _, by_format) = get_accept(&app, &format!("{path}?status=PAID&format=csv"), &admin, "*/*").await;
    assert_eq!(by_format, csv);

    // Attendees: one row per paid ticket, with the check-in.
    let attendees_path = format!("/api/v1/events/{event}/attendees");
    let attendees = app.get(&attendees_path, Some(&admin)).await;
    assert_eq!(attendees.json.as_array().unwrap().len(), 6, "{}", attendees.body);
    let res = app.get(&format!("/api/v1/orders/{}", paid[1]), Some(&buyers[1].1)).await;
    let ticket = res.json["tickets"][0]["id"].as_str().unwrap().to_owned();
    let code = res.json["tickets"][0]["code"].as_str().unwrap().to_owned();
    assert_eq!(app.post("/api/v1/check-ins", &json!({"code": code}), Some(&admin)).await.status, 200);
    let inside = app.get(&format!("{attendees_path}?checked_in=true"), Some(&admin)).await;
    assert_eq!(inside.json.as_array().unwrap().len(), 1, "{}", inside.body);
    assert_eq!(inside.json[0]["ticket_id"], ticket);
    assert!(inside.json[0]["checked_in_at"].is_string());
    assert_eq!(inside.json[0]["holder_name"], "Buyer");
    let outside = app.get(&format!("{attendees_path}?checked_in=false&limit=100"), Some(&admin)).await;
    assert_eq!(outside.json.as_array().unwrap().len(), 5);
    let (status, _, csv) = get_accept(&app, &format!("{attendees_path}?format=csv"), &admin, "*/*").await;
    assert_eq!(status, 200);
    assert_eq!(
        csv.lines().next(),
        Some("ticket_id,order_id,holder_name,holder_email,ticket_type_id,ticket_type,promo_code,checked_in_at")
    );
    assert_eq!(inside.json[0]["ticket_type"], "General admission");
    assert_eq!(csv.lines().count(), 7, "{csv}");

    // An event without orders: an empty page, a CSV of just the header.
    let empty = app.event_with(&admin, 5, 1).await;
    assert_eq!(app.get(&format!("/api/v1/events/{empty}/orders"), Some(&admin)).await.json, json!([]));
    let (_, _, csv) = get_accept(&app, &format!("/api/v1/events/{empty}/attendees?format=csv"), &admin, "*/*").await;
    assert_eq!(
        csv,
        "ticket_id,order_id,holder_name,holder_email,ticket_type_id,ticket_type,promo_code,checked_in_at\n"
    );

    // Refusals.
    let buyer = buyers[0].1.as_str();
    app.get(&path, Some(buyer)).await.assert_error(403, "forbidden");
    assert_eq!(app.get(&path, None).await.status, 401);
    app.get(&format!("/api/v1/events/{}/orders", Uuid::now_v7()), Some(&admin)).await.assert_error(404, "not_found");
    app.get(&format!("/api/v1/events/{}/attendees", Uuid::now_v7()), Some(&admin)).await.assert_error(404, "not_found");
    for query in
        ["status=paid", "status=PAID,", "format=xml", "limit=0", "limit=101", "format=csv&limit=10", "sort=name"]
    {
        app.get(&format!("{path}?{query}"), Some(&admin)).await.assert_error(400, "invalid_query");
    }
    for query in ["checked_in=maybe", "format=csv&cursor=0193b0a0-0000-7000-8000-000000000000"] {
        app.get(&format!("{attendees_path}?{query}"), Some(&admin)).await.assert_error(400, "invalid_query");
    }

    // A deleted event keeps its lists (its paid orders are still the organizer's business).
    sqlx::query("UPDATE events SET deleted_at = now() WHERE id = $1").bind(event).execute(&app.db.pool).await.unwrap();
    assert_eq!(app.get(&path, Some(&admin)).await.json.as_array().unwrap().len(), 5);
}
