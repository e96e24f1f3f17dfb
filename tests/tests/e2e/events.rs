//! The event catalogue: admin-only creation, editing and deletion with validation, public
//! listing and lookup.

use serde_json::json;
use tests::{TestApp, worker_decides};
use uuid::Uuid;

#[tokio::test]
async fn admin_creates_an_event_and_anyone_can_read_it() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let date = "2031-05-01T19:30:00+02:00";
    let res = app
        .create_event(&admin, json!({"date": date, "price": 12.5, "image_url": "https://img.example.com/a.png"}))
        .await;
    assert_eq!(res.status, 201, "{}", res.body);
    let id = res.json["id"].as_str().unwrap().to_owned();
    assert_eq!(res.header("location"), Some(format!("/api/v1/events/{id}").as_str()));
    assert_eq!(res.json["date"], "2031-05-01T17:30:00Z", "stored and shown in UTC");
    assert_eq!(res.json["price"], "12.50", "money is a decimal string");
    assert_eq!(res.json["capacity"], 100);
    assert_eq!(res.json["tickets_available"], 100);
    assert_eq!(res.json["max_per_order"], 4);
    assert_eq!(res.json["rating"], "all-ages");

    let fetched = app.get(&format!("/api/v1/events/{id}"), None).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.json, res.json);

    // Free events are allowed; max_per_order defaults to 10.
    let free = app.create_event(&admin, json!({"price": "0", "max_per_order": null})).await;
    assert_eq!(free.status, 201, "{}", free.body);
    assert_eq!((free.json["price"].as_str(), free.json["max_per_order"].as_i64()), (Some("0.00"), Some(10)));
}

#[tokio::test]
async fn only_admins_create_events() {
    let app = TestApp::spawn().await;
    let (_, user) = app.user("Ada").await;
    app.create_event(&user, json!({})).await.assert_error(403, "forbidden");
    let res = app.post("/api/v1/events", &json!({"name": "x"}), None).await;
    res.assert_error(401, "unauthorized");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn event_input_is_validated() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let cases = [
        (json!({"date": past}), "date must be in the future"),
        (json!({"price": "-1"}), "price must not be negative"),
        (json!({"price": -0.5}), "price must not be negative"),
        (json!({"price": "1.999"}), "at most 2 decimal places"),
        (json!({"capacity": 0}), "capacity must be between 1"),
        (json!({"capacity": -10}), "capacity must be between 1"),
        (json!({"max_per_order": 0}), "max_per_order must be between 1"),
        (json!({"name": "  "}), "name must not be empty"),
        (json!({"location": ""}), "location must not be empty"),
        (json!({"rating": "r".repeat(33)}), "rating must be at most 32"),
        (json!({"image_url": "javascript:alert(1)"}), "image_url must be an absolute http(s) URL"),
        (json!({"price": "free"}), "price must be a decimal number"),
    ];
    for (overrides, message) in cases {
        let res = app.create_event(&admin, overrides.clone()).await;
        res.assert_error(422, "validation_failed");
        assert!(res.json["error"]["message"].as_str().unwrap().contains(message), "{overrides}: {}", res.body);
    }
    for (overrides, what) in [
        (json!({"date": "tomorrow"}), "unparseable date"),
        (json!({"price": true}), "price of the wrong type"),
        (json!({"capacity": "many"}), "capacity of the wrong type"),
    ] {
        let res = app.create_event(&admin, overrides).await;
        res.assert_error(422, "invalid_body");
        assert!(!res.body.contains("sqlx"), "{what}: {}", res.body);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(count, 0, "nothing invalid was stored");
}

#[tokio::test]
async fn events_are_listed_newest_first_page_by_page() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let mut created = Vec::new();
    for i in 0..5 {
        let res = app.create_event(&admin, json!({"name": format!("Event {i}"), "capacity": 10 + i})).await;
        assert_eq!(res.status, 201, "{}", res.body);
        created.push(res.json["id"].as_str().unwrap().to_owned());
    }
    // Some tickets sold on one of them (as the pipeline would).
    sqlx::query("UPDATE events SET sold = 3 WHERE id = $1::uuid")
        .bind(&created[4])
        .execute(&app.db.pool)
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut path = "/api/v1/events?limit=2".to_owned();
    loop {
        let page = app.get(&path, None).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let items = page.json.as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        if items.first().is_some_and(|e| e["id"] == created[4].as_str()) {
            assert_eq!(items[0]["tickets_available"], 14 - 3);
        }
        match page.header("x-next-cursor") {
            Some(cursor) => {
                let link = page.header("link").unwrap();
                assert!(link.contains(&format!("cursor={cursor}")) && link.ends_with("rel=\"next\""), "{link}");
                path = format!("/api/v1/events?limit=2&cursor={cursor}");
            }
            None => break,
        }
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    // Soft-deleted events are hidden from the list and from lookup.
    sqlx::query("UPDATE events SET deleted_at = now() WHERE id = $1::uuid")
        .bind(&created[0])
        .execute(&app.db.pool)
        .await
        .unwrap();
    let all = app.get("/api/v1/events?limit=100", None).await;
    assert_eq!(all.json.as_array().unwrap().len(), 4);
    app.get(&format!("/api/v1/events/{}", created[0]), None).await.assert_error(404, "not_found");

    for bad in ["limit=0", "limit=101", "limit=abc", "cursor=not-a-uuid"] {
        app.get(&format!("/api/v1/events?{bad}"), None).await.assert_error(400, "invalid_query");
    }
}

#[tokio::test]
async fn unknown_events_are_404() {
    let app = TestApp::spawn().await;
    app.get(&format!("/api/v1/events/{}", uuid::Uuid::now_v7()), None).await.assert_error(404, "not_found");
    app.get("/api/v1/events/not-a-uuid", None).await.assert_error(404, "not_found");
}

#[tokio::test]
async fn admins_edit_events_within_the_rules() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let path = format!("/api/v1/events/{event}");
    let order = app.pending_order(&buyers[0].1, event, 4).await;

    // A partial edit keeps the other fields; a new price applies to new orders only.
    let res = app.patch(&path, &json!({"name": "  Renamed ", "price": "99.00", "rating": null}), Some(&admin)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!((res.json["name"].as_str(), res.json["price"].as_str()), (Some("Renamed"), Some("99.00")));
    assert!(res.json["rating"].is_null());
    assert_eq!((res.json["location"].as_str(), res.json["capacity"].as_i64()), (Some("Main Hall"), Some(10)));
    let held = app.get(&format!("/api/v1/orders/{order}"), Some(&buyers[0].1)).await;
    assert_eq!(held.json["total"], "199.60", "the order keeps the price it was placed at: {}", held.body);

    // Capacity never below what is sold or held; raising it puts tickets on sale.
    let res = app.patch(&path, &json!({"capacity": 3}), Some(&admin)).await;
    res.assert_error(409, "capacity_below_sold");
    let res = app.patch(&path, &json!({"capacity": 4}), Some(&admin)).await;
    assert_eq!((res.status, res.json["tickets_available"].as_i64()), (200, Some(0)), "{}", res.body);
    let res = app.patch(&path, &json!({"capacity": 6}), Some(&admin)).await;
    assert_eq!(res.json["tickets_available"], 2);
    app.pending_order(&buyers[1].1, event, 2).await;
    assert_eq!(app.assert_consistent(event).await, (6, 6));

    // The same rules as creation; unknown fields and non-admins are refused.
    let past = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    app.patch(&path, &json!({"date": past}), Some(&admin)).await.assert_error(422, "validation_failed");
    app.patch(&path, &json!({"price": "-1"}), Some(&admin)).await.assert_error(422, "validation_failed");
    app.patch(&path, &json!({"name": null}), Some(&admin)).await.assert_error(422, "invalid_body");
    app.patch(&path, &json!({"sold": 0}), Some(&admin)).await.assert_error(422, "invalid_body");
    app.patch(&path, &json!({"name": "Mine"}), Some(&buyers[0].1)).await.assert_error(403, "forbidden");
    app.patch(&path, &json!({"name": "Mine"}), None).await.assert_error(401, "unauthorized");
    let unknown = format!("/api/v1/events/{}", Uuid::now_v7());
    app.patch(&unknown, &json!({"name": "Ghost"}), Some(&admin)).await.assert_error(404, "not_found");
}

#[tokio::test]
async fn deleting_an_event_rejects_its_unpaid_orders_and_hides_it() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let mut worker = app.spawn_worker(&[]);
    let admin = app.admin().await;
    let buyers = app.buyers(3).await;

    // Paid orders block the deletion.
    let paid_event = app.event_with(&admin, 10, 4).await;
    let paid = app.pending_order(&buyers[0].1, paid_event, 1).await;
    assert_eq!(app.payment(paid, &json!({"status": "PAID"})).await.status, 204);
    let res = app.delete(&format!("/api/v1/events/{paid_event}"), Some(&admin)).await;
    res.assert_error(409, "event_has_paid_orders");
    assert_eq!(app.get(&format!("/api/v1/events/{paid_event}"), None).await.status, 200);

    // A held order and one still queued are rejected with the event; capacity comes back.
    let event = app.event_with(&admin, 10, 4).await;
    let held = app.pending_order(&buyers[1].1, event, 3).await;
    worker.kill();
    let queued = app.order(&buyers[2].1, event, 2, None).await;
    let queued: Uuid = queued.json["id"].as_str().unwrap().parse().unwrap();
    let path = format!("/api/v1/events/{event}");
    app.delete(&path, Some(&buyers[0].1)).await.assert_error(403, "forbidden");
    let res = app.delete(&path, Some(&admin)).await;
    assert_eq!(res.status, 204, "{}", res.body);
    for (order, token) in [(held, &buyers[1].1), (queued, &buyers[2].1)] {
        let res = app.get(&format!("/api/v1/orders/{order}"), Some(token)).await;
        assert_eq!(
            (res.json["status"].as_str(), res.json["reason"].as_str()),
            (Some("REJECTED"), Some("EVENT_UNAVAILABLE"))
        );
    }
    assert_eq!(app.assert_consistent(event).await, (10, 0));
    // The queued order's message is still in its queue: the worker skips it.
    let _worker = app.worker().await;
    app.wait_until_final(std::time::Duration::from_secs(30)).await;
    assert_eq!(app.assert_consistent(event).await, (10, 0));

    // Gone for the public and from sale; visible to admins with deleted_at.
    app.get(&path, None).await.assert_error(404, "not_found");
    app.get(&path, Some(&buyers[0].1)).await.assert_error(404, "not_found");
    let seen = app.get(&path, Some(&admin)).await;
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert!(seen.json["deleted_at"].is_string(), "{}", seen.body);
    let listed = app.get("/api/v1/events", None).await;
    assert!(listed.json.as_array().unwrap().iter().all(|e| e["id"] != event.to_string()));
    app.order(&buyers[0].1, event, 1, None).await.assert_error(404, "not_found");
    app.delete(&path, Some(&admin)).await.assert_error(404, "not_found");
    app.patch(&path, &json!({"name": "Back"}), Some(&admin)).await.assert_error(404, "not_found");
}
