//! A pre-sale queue drawn by lot: orders placed between `prequeue_opens_at` and
//! `sales_start` are entries, numbered at the opening by one draw that anyone can recompute
//! from the seed and the entries, and decided in that order, ahead of every later order.
//! Exact counts throughout.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use sha2::Digest;
use tests::{Response, TestApp};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

fn id(response: &Response) -> Uuid {
    response.json["id"].as_str().expect("order id").parse().expect("uuid")
}

/// An event of `capacity` whose pre-sale queue opened a second ago and whose sale opens in
/// an hour (tests bring the opening forward in the database: see [`open_now`]). Its queue
/// takes ten times its capacity before queue full (the draw adds every entry to it).
async fn presale_event(app: &TestApp, admin: &str, capacity: i64) -> Uuid {
    let now = chrono::Utc::now();
    let body = json!({
        "capacity": capacity,
        "max_per_order": 4,
        "max_per_buyer": null,
        "queue_demand_factor": 10,
        "prequeue_opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
        "sales_start": (now + chrono::Duration::hours(1)).to_rfc3339(),
    });
    let res = app.create_event(admin, body).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert!(res.json["draw_seed_sha256"].as_str().is_some_and(|h| h.len() == 64), "{}", res.body);
    assert_eq!(res.json["draw_seed"], Value::Null, "the seed is secret until the opening: {}", res.body);
    res.json["id"].as_str().expect("event id").parse().expect("uuid")
}

/// The opening, a second from now, waited for: what waiting for `sales_start` would do
/// (the api's rules forbid moving it once the pre-sale queue is open; the api hears of the
/// change from the `event_changes` notification meanwhile).
async fn open_now(app: &TestApp, event: Uuid) {
    sqlx::query("UPDATE events SET sales_start = now() + interval '1 second' WHERE id = $1")
        .bind(event)
        .execute(&app.db.pool)
        .await
        .expect("open the sale");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}

/// Every entry of the event's draw, as `GET /events/{id}/draw` pages them, and the seed.
async fn draw_of(app: &TestApp, admin: &str, event: Uuid) -> (Value, Vec<Value>) {
    let mut entries = Vec::new();
    let mut path = format!("/api/v1/events/{event}/draw?limit=100");
    loop {
        let res = app.get(&path, Some(admin)).await;
        assert_eq!(res.status, 200, "{}", res.body);
        entries.extend(res.json["entries"].as_array().expect("entries").iter().cloned());
        match res.headers.get("x-next-cursor") {
            Some(cursor) => {
                path = format!("/api/v1/events/{event}/draw?limit=100&cursor={}", cursor.to_str().expect("ascii"));
            }
            None => return (res.json, entries),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

/// 500 buyers join the pre-sale of an event of 100 (one of them twice, refused; one cancels):
/// at the opening one draw numbers the 499 entries; recomputed from the seed and the entries
/// here, the order is the draw's; exactly the first 100 of it get tickets, which are not
/// the first 100 to arrive; 20 orders placed after the opening are numbered and decided
/// after every entry. (The sold-out fast path is off: the worker may have sold the 100 before
/// those 20 arrive, and the fast path would then refuse them at the door.)
#[tokio::test]
async fn pre_sale_entries_are_decided_in_the_order_of_one_recorded_draw() {
    let app = TestApp::spawn_with(&[("SOLD_OUT_FAST_PATH", "false".to_owned())]).await;
    let admin = app.admin().await;
    let event = presale_event(&app, &admin, 100).await;
    let buyers = app.buyers(520).await;

    let entries = join_all(buyers[..500].iter().map(|(_, token)| app.order(token, event, 1, None))).await;
    for res in &entries {
        assert_eq!(res.status, 202, "{}", res.body);
        assert_eq!(res.json["presale_entry"], true, "{}", res.body);
        assert_eq!((res.json["queue_number"].clone(), res.json["queue_position"].clone()), (Value::Null, Value::Null));
        assert!(res.json["sales_start"].is_string(), "{}", res.body);
    }
    let again = app.order(&buyers[0].1, event, 2, None).await;
    assert_eq!((again.status, again.json["error"]["code"].clone()), (409, json!("already_queued")), "{}", again.body);
    assert_eq!(again.json["error"]["order_id"], entries[0].json["id"], "{}", again.body);
    let cancelled =
        app.post(&format!("/api/v1/orders/{}/cancel", id(&entries[1])), &json!({}), Some(&buyers[1].1)).await;
    assert_eq!((cancelled.status, cancelled.json["status"].clone()), (200, json!("CANCELLED")), "{}", cancelled.body);
    let (before, listed) = draw_of(&app, &admin, event).await;
    assert_eq!((before["entry_count"].clone(), listed.len()), (json!(499), 499), "{before}");
    assert!(listed.iter().all(|e| e["key"].is_null() && e["queue_number"].is_null()), "nothing drawn yet");

    let mut worker = app.worker().await;
    open_now(&app, event).await;
    assert!(worker.steps().draws().await, "the worker's draw loop ran");
    let late = join_all(buyers[500..].iter().map(|(_, token)| app.order(token, event, 1, None))).await;
    for res in &late {
        assert_eq!(res.status, 202, "{}", res.body);
        assert!(res.json["queue_number"].as_i64().is_some_and(|n| n > 499), "behind every entry: {}", res.body);
    }
    app.wait_until_final(SETTLE).await;
    drop(worker.stop().await);

    let (draw, listed) = draw_of(&app, &admin, event).await;
    let seed = unhex(draw["seed"].as_str().expect("the seed, after the opening"));
    assert_eq!(draw["seed_sha256"], hex(&sha2::Sha256::digest(&seed)), "the seed is the one announced");
    let mut recomputed: Vec<(String, Uuid, i64)> = listed
        .iter()
        .map(|entry| {
            let order: Uuid = entry["order_id"].as_str().expect("id").parse().expect("uuid");
            let key = hex(&common::sales::draw::key(&seed, order));
            assert_eq!(entry["key"], key, "the api's key is SHA-256(seed ‖ id)");
            (key, order, entry["queue_number"].as_i64().expect("a number"))
        })
        .collect();
    recomputed.sort();
    let numbers: Vec<i64> = recomputed.iter().map(|(_, _, n)| *n).collect();
    assert_eq!(numbers, (1..=499).collect::<Vec<_>>(), "numbered 1..499 in key order");

    let statuses: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, status FROM orders WHERE event_id = $1")
            .bind(event)
            .fetch_all(&app.db.pool)
            .await
            .expect("statuses")
            .into_iter()
            .collect();
    let winners: HashSet<Uuid> = recomputed[..100].iter().map(|(_, order, _)| *order).collect();
    let pending: HashSet<Uuid> = statuses.iter().filter(|(_, s)| *s == "PENDING").map(|(id, _)| *id).collect();
    assert_eq!(pending, winners, "exactly the first 100 of the draw hold tickets");
    let mut arrival: Vec<Uuid> = recomputed.iter().map(|(_, order, _)| *order).collect();
    arrival.sort(); // UUID v7: creation order
    assert_ne!(arrival[..100].iter().copied().collect::<HashSet<_>>(), winners, "not the first 100 to arrive");
    assert!(late.iter().all(|res| statuses[&id(res)] == "REJECTED"), "the 20 after the opening come after the draw");
    assert_eq!(app.assert_consistent(event).await, (100, 100));
    let (drawn_at, entries_drawn): (Option<chrono::DateTime<chrono::Utc>>, Option<i32>) =
        sqlx::query_as("SELECT drawn_at, draw_entries FROM events WHERE id = $1")
            .bind(event)
            .fetch_one(&app.db.pool)
            .await
            .expect("the draw");
    assert!(drawn_at.is_some());
    assert_eq!(entries_drawn, Some(499));
}

/// The draw happens once whoever runs it: a worker process (drawing every 50 ms) is killed
/// at the opening second, four draws race in this process, and 40 orders arrive (each api
/// request finding the draw pending runs it). Every entry gets one number, all before the
/// 40 orders'.
#[tokio::test]
async fn the_draw_happens_exactly_once_whoever_runs_it_and_survives_a_killed_worker() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = presale_event(&app, &admin, 1_000).await;
    let buyers = app.buyers(140).await;
    let entries = join_all(buyers[..100].iter().map(|(_, token)| app.order(token, event, 1, None))).await;
    assert!(entries.iter().all(|r| r.status == 202 && r.json["presale_entry"] == true), "{entries:?}");

    let mut killed = app.spawn_worker(&[("EXPIRY_INTERVAL_MS", "50".to_owned())]);
    open_now(&app, event).await;
    killed.kill();
    let pool = &app.db.pool;
    let (draws, late) = tokio::join!(
        join_all((0..4).map(|_| common::sales::draw::draw(pool, event))),
        join_all(buyers[100..].iter().map(|(_, token)| app.order(token, event, 1, None)))
    );
    let drew =
        draws.into_iter().map(|d| d.expect("a draw")).filter(|d| matches!(d, common::sales::draw::Drawn::Drew(_)));
    assert!(drew.count() <= 1, "at most one of the racing draws drew (or the api, or the killed worker)");
    assert!(late.iter().all(|r| r.status == 202), "{late:?}");

    let numbers: Vec<(bool, Option<i64>)> =
        sqlx::query_as("SELECT presale_entry, queue_number FROM orders WHERE event_id = $1 ORDER BY queue_number")
            .bind(event)
            .fetch_all(pool)
            .await
            .expect("numbers");
    let all: Vec<i64> = numbers.iter().map(|(_, n)| n.expect("every order numbered")).collect();
    assert_eq!(all, (1..=140).collect::<Vec<_>>(), "one number each, no gaps, no repeats: one draw");
    assert!(numbers[..100].iter().all(|(entry, _)| *entry), "the 100 entries first");
    assert!(numbers[100..].iter().all(|(entry, _)| !*entry), "the 40 orders after them");
    let _worker = app.worker().await;
    app.wait_until_final(SETTLE).await;
    assert_eq!(app.assert_consistent(event).await, (1_000, 140));
}

/// The pre-sale's rules at the door: orders before the queue opens are refused, times are
/// checked, and fixed once the queue has opened; an entry can be withdrawn until the draw,
/// not after.
#[tokio::test]
async fn pre_sale_times_are_checked_and_fixed_once_the_queue_opens() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let buyers = app.buyers(1).await;
    let now = chrono::Utc::now();
    let at = |hours: i64| (now + chrono::Duration::hours(hours)).to_rfc3339();
    for (body, why) in [
        (json!({"prequeue_opens_at": at(1)}), "a pre-sale needs a sales_start"),
        (json!({"prequeue_opens_at": at(2), "sales_start": at(1)}), "the queue opens before the sale"),
        (json!({"sales_start": at(24 * 40)}), "the sale opens before the event (in 30 days)"),
    ] {
        let res = app.create_event(&admin, body).await;
        assert_eq!(
            (res.status, res.json["error"]["code"].clone()),
            (422, json!("validation_failed")),
            "{why}: {}",
            res.body
        );
    }
    let res = app.create_event(&admin, json!({"prequeue_opens_at": at(1), "sales_start": at(2)})).await;
    assert_eq!(res.status, 201, "{}", res.body);
    let event = res.json["id"].as_str().expect("id").to_owned();
    let early = app.order(&buyers[0].1, event.parse().expect("uuid"), 1, None).await;
    assert_eq!((early.status, early.json["error"]["code"].clone()), (422, json!("not_on_sale")), "{}", early.body);
    let path = format!("/api/v1/events/{event}");
    let moved = app.patch(&path, &json!({"sales_start": at(3)}), Some(&admin)).await;
    assert_eq!(moved.status, 200, "not open yet: {}", moved.body);
    let draw = app.get(&format!("{path}/draw"), Some(&admin)).await;
    assert_eq!((draw.status, draw.json["entry_count"].clone()), (200, json!(0)), "{}", draw.body);
    assert_eq!(app.get(&format!("{path}/draw"), Some(&buyers[0].1)).await.status, 403);

    // Opened (in the database, as time would): the times are fixed.
    sqlx::query("UPDATE events SET prequeue_opens_at = now() - interval '1 minute' WHERE id = $1::uuid")
        .bind(&event)
        .execute(&app.db.pool)
        .await
        .expect("open the queue");
    let fixed = app.patch(&path, &json!({"sales_start": at(4)}), Some(&admin)).await;
    assert_eq!((fixed.status, fixed.json["error"]["code"].clone()), (409, json!("presale_started")), "{}", fixed.body);
    let other = app.patch(&path, &json!({"name": "Renamed"}), Some(&admin)).await;
    assert_eq!(other.status, 200, "other fields still change: {}", other.body);
    let entered = presale_event(&app, &admin, 10).await;
    let buyers = app.buyers(2).await;
    let entries = join_all(buyers.iter().map(|(_, token)| app.order(token, entered, 1, None))).await;
    let withdrawn =
        app.post(&format!("/api/v1/orders/{}/cancel", id(&entries[0])), &json!({}), Some(&buyers[0].1)).await;
    assert_eq!((withdrawn.status, withdrawn.json["status"].clone()), (200, json!("CANCELLED")), "{}", withdrawn.body);
    open_now(&app, entered).await;
    let drawn = common::sales::draw::draw(&app.db.pool, entered).await.expect("the draw");
    assert!(matches!(&drawn, common::sales::draw::Drawn::Drew(orders) if orders.len() == 1), "{drawn:?}");
    // No worker runs: the entry is drawn, still QUEUED, and no longer withdrawn.
    let late = app.post(&format!("/api/v1/orders/{}/cancel", id(&entries[1])), &json!({}), Some(&buyers[1].1)).await;
    assert_eq!((late.status, late.json["error"]["code"].clone()), (409, json!("invalid_transition")), "{}", late.body);
    assert_eq!(
        common::sales::draw::draw(&app.db.pool, entered).await.expect("again"),
        common::sales::draw::Drawn::Nothing
    );

    let plain = app.create_event(&admin, json!({})).await;
    let plain_id = plain.json["id"].as_str().expect("id");
    assert_eq!(app.get(&format!("/api/v1/events/{plain_id}/draw"), Some(&admin)).await.status, 404, "no pre-sale");
}
