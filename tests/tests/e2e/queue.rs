//! The purchase queue as buyers see it: each queued order's place in line (its number in
//! its event's queue less the worker's highest decided number) and expected wait, and queue
//! full, the refusal at the door of orders the queue cannot serve. Exact counts throughout.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tests::{Response, TestApp};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

fn id(response: &Response) -> Uuid {
    response.json["id"].as_str().expect("order id").parse().expect("uuid")
}

/// `(queue_number, queue_position)` of each order, read with `GET /orders/{id}`.
async fn places(app: &TestApp, orders: &[(Uuid, String)]) -> Vec<(Option<i64>, Option<i64>)> {
    join_all(orders.iter().map(|(order, token)| async move {
        let res = app.get(&format!("/api/v1/orders/{order}"), Some(token)).await;
        assert_eq!(res.status, 200, "{}", res.body);
        (res.json["queue_number"].as_i64(), res.json["queue_position"].as_i64())
    }))
    .await
}

/// Places one order per buyer: the first `one_by_one` in turn, the rest all at once.
async fn place(app: &TestApp, buyers: &[(Uuid, String)], event: Uuid, one_by_one: usize) -> Vec<Response> {
    let mut responses = Vec::with_capacity(buyers.len());
    for (_, token) in &buyers[..one_by_one] {
        responses.push(app.order(token, event, 1, None).await);
    }
    responses.extend(join_all(buyers[one_by_one..].iter().map(|(_, token)| app.order(token, event, 1, None))).await);
    assert!(responses.iter().all(|r| r.status == 202), "{responses:?}");
    responses
}

/// 200 orders of one event queued while no worker runs have places 1..200, in the order
/// they arrived; once the worker has decided them they have none, and the next 100 are
/// numbered 201..300 at places 1..100 (behind a serving counter of 200); once the worker
/// has decided twice within 30 s the event's rate is known, and so is a new order's wait.
#[tokio::test]
async fn queued_orders_know_their_place_and_it_falls_as_the_worker_decides() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 1_000, 4).await;
    let buyers = app.buyers(301).await;
    let with_tokens = |responses: &[Response], from: usize| -> Vec<(Uuid, String)> {
        responses.iter().enumerate().map(|(i, res)| (id(res), buyers[from + i].1.clone())).collect()
    };

    // 40 one by one (numbers 1..40 in that order), then 160 at once.
    let first = place(&app, &buyers[..200], event, 40).await;
    for (n, res) in first.iter().enumerate().take(40) {
        assert_eq!(res.json["queue_number"], json!(n + 1), "{}", res.body);
    }
    for res in &first {
        assert_eq!(res.json["queue_position"], res.json["queue_number"], "nothing decided yet: {}", res.body);
        assert_eq!(res.json["estimated_wait_secs"], Value::Null, "no rate yet: {}", res.body);
    }
    let first = with_tokens(&first, 0);
    let before = places(&app, &first).await;
    assert!(before.iter().all(|(n, p)| n == p), "place = number while nothing is decided: {before:?}");
    let mut numbers: Vec<i64> = before.iter().map(|(n, _)| n.expect("a number")).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=200).collect::<Vec<_>>(), "numbered 1..200 without gaps or repeats");
    let queue = app.get(&format!("/api/v1/events/{event}"), Some(&admin)).await.json["queue"].clone();
    assert_eq!(queue, json!({"orders": 200, "tickets": 200, "decided_per_sec": null}));
    let public = app.get(&format!("/api/v1/events/{event}"), Some(&buyers[0].1)).await;
    assert!(public.json.get("queue").is_none(), "the queue is shown to admins only: {}", public.body);

    let mut worker = app.worker().await;
    app.wait_until_final(SETTLE).await;
    drop(worker.stop().await);
    let after = places(&app, &first).await;
    assert!(after.iter().all(|(n, p)| n.is_some() && p.is_none()), "decided orders have no place: {after:?}");

    let second = place(&app, &buyers[200..300], event, 100).await;
    for (n, res) in second.iter().enumerate() {
        assert_eq!(res.json["queue_number"], json!(201 + n), "{}", res.body);
        assert_eq!(res.json["queue_position"], json!(1 + n), "200 decided, so number 201 is next: {}", res.body);
    }
    let second = with_tokens(&second, 200);
    let read: Vec<Option<i64>> = places(&app, &second).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(read, (1..=100).map(Some).collect::<Vec<_>>());

    let mut worker = app.worker().await;
    app.wait_until_final(SETTLE).await;
    drop(worker.stop().await);
    let late = app.order(&buyers[300].1, event, 1, None).await;
    assert_eq!(late.status, 202, "{}", late.body);
    assert_eq!((late.json["queue_number"].clone(), late.json["queue_position"].clone()), (json!(301), json!(1)));
    let wait = late.json["estimated_wait_secs"].as_i64();
    assert!(wait.is_some_and(|secs| secs >= 1), "two decisions within 30 s give a rate: {}", late.body);
    let queue = app.get(&format!("/api/v1/events/{event}"), Some(&admin)).await.json["queue"].clone();
    assert_eq!((queue["orders"].clone(), queue["tickets"].clone()), (json!(1), json!(1)), "{queue}");
    assert!(queue["decided_per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{queue}");
}

/// Queue full at the default factor of 3: an event with 10 tickets left takes queued orders
/// for exactly 30 tickets, 40 buyers at once or not; past that a new order is refused at
/// once (409 `queue_full`, with what is left and queued and where to wait instead). An event's
/// own factor overrides the deployment's; once sold out, the sold-out answer is unchanged.
#[tokio::test]
async fn queue_full_refuses_exactly_past_the_factor() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(45).await;

    let responses = join_all(buyers[..40].iter().map(|(_, token)| app.order(token, event, 1, None))).await;
    let accepted = responses.iter().filter(|r| r.status == 202).count();
    let full: Vec<&Response> = responses.iter().filter(|r| r.json["error"]["code"] == "queue_full").collect();
    assert_eq!((accepted, full.len()), (30, 10), "{responses:?}");
    for res in &full {
        assert_eq!(res.status, 409);
        assert_eq!(res.json["error"]["tickets_left"], 10, "{}", res.body);
        assert_eq!(res.json["error"]["tickets_queued"], 30, "{}", res.body);
        assert_eq!(res.json["error"]["waitlist_url"], format!("/api/v1/events/{event}/waitlist"), "{}", res.body);
    }
    let refused = app.order(&buyers[40].1, event, 1, None).await;
    assert_eq!((refused.status, refused.json["error"]["tickets_queued"].clone()), (409, json!(30)), "{}", refused.body);

    // Its own factor: 3.1 times 10 takes one more ticket, not two.
    let path = format!("/api/v1/events/{event}");
    for bad in [json!(0.5), json!(10_001), json!("3")] {
        let res = app.patch(&path, &json!({"queue_demand_factor": bad}), Some(&admin)).await;
        assert_eq!(res.status, 422, "{bad}: {}", res.body);
    }
    let res = app.patch(&path, &json!({"queue_demand_factor": 3.1}), Some(&admin)).await;
    assert_eq!((res.status, res.json["queue_demand_factor"].clone()), (200, json!(3.1)), "{}", res.body);
    assert_eq!(app.order(&buyers[41].1, event, 2, None).await.status, 409, "30 + 2 > 31");
    assert_eq!(app.order(&buyers[41].1, event, 1, None).await.status, 202, "30 + 1 <= 31");
    assert_eq!(app.order(&buyers[42].1, event, 1, None).await.json["error"]["code"], "queue_full", "31 + 1 > 31");
    assert_eq!(app.order(&buyers[43].1, event, 1, None).await.json["error"]["code"], "queue_full");
    // Back to the deployment's factor.
    let res = app.patch(&path, &json!({"queue_demand_factor": null}), Some(&admin)).await;
    assert_eq!((res.status, res.json["queue_demand_factor"].clone()), (200, Value::Null), "{}", res.body);

    let _worker = app.worker().await;
    app.wait_until_final(SETTLE).await;
    assert_eq!(app.assert_consistent(event).await, (10, 10));
    let sold_out = app.order(&buyers[44].1, event, 1, None).await;
    assert_eq!(
        (sold_out.status, sold_out.json["error"]["code"].clone()),
        (409, json!("sold_out")),
        "{}",
        sold_out.body
    );
}
