//! The second security probe's findings (issue 29), each reproduced against the real api:
//! deleted and deactivated accounts, connections held open, one buyer taking a whole event,
//! a currency change that re-priced ticket types, the waiting list's races, log
//! amplification, webhook reflection, and the smaller ones.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{PASSWORD, TestApp, worker_decides};
use uuid::Uuid;

/// Finding 1: after `DELETE FROM users` an admin's token still changed roles, listed accounts
/// and created ticket types; a buyer's read its orders. Deletion (by an operator or by
/// `DELETE /users/{id}`) and deactivation now revoke every token, in every api process, and
/// in one that starts afterwards.
#[tokio::test]
async fn deleted_or_deactivated_accounts_lose_access_in_every_api_process() {
    let app = TestApp::spawn().await;
    let (_other_api, other_base) = app.spawn_another_api();
    let admin = app.admin().await;
    let (rogue, rogue_email) = app.signup("rogue").await;
    let (victim, victim_email) = app.signup("victim").await;
    let promoted = app.patch(&format!("/api/v1/users/{rogue}/role"), &json!({"role": "admin"}), Some(&admin)).await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    let rogue_token = app.token_for(&rogue_email).await;
    let victim_token = app.token_for(&victim_email).await;
    assert_eq!(app.get("/api/v1/users", Some(&rogue_token)).await.status, 200);

    // An operator removes the compromised admin in psql.
    sqlx::query("DELETE FROM users WHERE id = $1").bind(rogue).execute(&app.db.pool).await.unwrap();
    let status = tests::refused_within_a_second(&app.client, &app.url("/api/v1/users"), &rogue_token).await;
    assert_eq!(status, 401, "the deleted admin's token still lists accounts");
    let status = tests::refused_within_a_second(&app.client, &format!("{other_base}/api/v1/users"), &rogue_token).await;
    assert_eq!(status, 401, "the other api still takes the deleted admin's token");
    let res = app.patch(&format!("/api/v1/users/{victim}/role"), &json!({"role": "admin"}), Some(&rogue_token)).await;
    res.assert_error(401, "unauthorized");
    let role: String =
        sqlx::query_scalar("SELECT role FROM users WHERE id = $1").bind(victim).fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(role, "user");

    // An admin deactivates an account through the api: its tokens stop, it cannot log in,
    // until it is reactivated (the old token stays refused).
    let path = format!("/api/v1/users/{victim}/deactivate");
    app.post(&path, &json!({}), Some(&victim_token)).await.assert_error(403, "forbidden");
    let res = app.post(&path, &json!({}), Some(&admin)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert!(res.json["deactivated_at"].is_string(), "{}", res.body);
    for base in [app.base.as_str(), other_base.as_str()] {
        let status = tests::refused_within_a_second(&app.client, &format!("{base}/api/v1/orders"), &victim_token).await;
        assert_eq!(status, 401, "{base} still takes a deactivated account's token");
    }
    app.login(&victim_email, PASSWORD).await.assert_error(403, "account_deactivated");
    app.login(&victim_email, "not the password").await.assert_error(401, "unauthorized");
    let res = app.post(&format!("/api/v1/users/{victim}/reactivate"), &json!({}), Some(&admin)).await;
    assert_eq!((res.status, &res.json["deactivated_at"]), (200, &Value::Null), "{}", res.body);
    let fresh = app.token_for(&victim_email).await;
    assert_eq!(app.get("/api/v1/me", Some(&fresh)).await.status, 200);
    app.get("/api/v1/me", Some(&victim_token)).await.assert_error(401, "unauthorized");

    // Deleting through the api: only an account nothing refers to; the last admin stays.
    let (gone, gone_email) = app.signup("gone").await;
    let gone_token = app.token_for(&gone_email).await;
    app.delete(&format!("/api/v1/users/{gone}"), Some(&fresh)).await.assert_error(403, "forbidden");
    app.delete(&format!("/api/v1/users/{}", Uuid::now_v7()), Some(&admin)).await.assert_error(404, "not_found");
    assert_eq!(app.delete(&format!("/api/v1/users/{gone}"), Some(&admin)).await.status, 204);
    app.get("/api/v1/me", Some(&gone_token)).await.assert_error(401, "unauthorized");
    let status = tests::refused_within_a_second(&app.client, &format!("{other_base}/api/v1/me"), &gone_token).await;
    assert_eq!(status, 401);
    app.login(&gone_email, PASSWORD).await.assert_error(401, "unauthorized");
    let event = app.event_with(&admin, 10, 2).await;
    let (holder, holder_token) = app.user("holder").await;
    assert_eq!(app.order(&holder_token, event, 1, None).await.status, 202);
    app.delete(&format!("/api/v1/users/{holder}"), Some(&admin)).await.assert_error(409, "account_has_records");
    let me: Value = app.get("/api/v1/me", Some(&admin)).await.json;
    let admin_id = me["id"].as_str().unwrap();
    app.delete(&format!("/api/v1/users/{admin_id}"), Some(&admin)).await.assert_error(409, "last_admin");
    app.post(&format!("/api/v1/users/{admin_id}/deactivate"), &json!({}), Some(&admin))
        .await
        .assert_error(409, "last_admin");

    // An api process that starts after the deletions learns of them from the database.
    let (_late_api, late_base) = app.spawn_another_api();
    for token in [&rogue_token, &gone_token, &victim_token] {
        let res = app.client.get(format!("{late_base}/api/v1/me")).bearer_auth(token).send().await.unwrap();
        assert_eq!(res.status(), 401);
    }
}

/// Finding 1: a deleted account's token answered 500 where it joined a waiting list or asked
/// for a refund (foreign keys missing from those mapped to 401). Every foreign key that
/// points at `users` is mapped: the list is the schema's.
#[tokio::test]
async fn every_foreign_key_to_users_answers_401() {
    let app = TestApp::spawn().await;
    let mut in_schema: Vec<String> = sqlx::query_scalar(
        "SELECT conname::text FROM pg_constraint WHERE contype = 'f' AND confrelid = 'users'::regclass",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    in_schema.sort();
    let mut mapped: Vec<String> = api::USER_REFERENCES.iter().map(|name| (*name).to_owned()).collect();
    mapped.sort();
    assert_eq!(mapped, in_schema);

    // The two that were missing, met by a token of an account that never existed (so that no
    // revocation refuses it first).
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 2, 2).await;
    let (_, buyer) = app.user("ada").await;
    let order = app.pending_order(&buyer, event, 2).await;
    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    let ghost = tests::mint_token(Uuid::now_v7(), "admin");
    let res = app.post(&format!("/api/v1/events/{event}/waitlist"), &json!({"quantity": 1}), Some(&ghost)).await;
    res.assert_error(401, "unauthorized");
    let res = app.post(&format!("/api/v1/orders/{order}/refund"), &json!({}), Some(&ghost)).await;
    res.assert_error(401, "unauthorized");
    let refunds: i64 = sqlx::query_scalar("SELECT count(*) FROM refunds").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(refunds, 0);
}

/// Which of `streams` the server has closed (end of file or a reset), looking at all of them
/// at once for 100 ms.
async fn closed_by_server(streams: &mut [tokio::net::TcpStream]) -> Vec<bool> {
    use tokio::io::AsyncReadExt;
    let looks = streams.iter_mut().map(|stream| async move {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    });
    futures_util::future::join_all(looks).await
}

/// `/health/ready` on a connection of its own, as a monitor would: answered.
async fn ready_on_a_new_connection(app: &TestApp) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(5)).build().unwrap();
    let res = client.get(app.url("/health/ready")).send().await.expect("/health/ready answers during the flood");
    assert_eq!(res.status(), 200);
}

/// Finding 2: idle connections and slow headers were held for 300 s, and 20,400 of them used
/// up the api's file descriptors (`/health/live` and `/login` timed out). Now a connection
/// that does not send a request head within `HTTP_HEADER_TIMEOUT_SECS` is closed, and at
/// `HTTP_MAX_CONNECTIONS` the connection idle the longest makes room for a new one.
#[tokio::test]
async fn idle_floods_and_slow_headers_cannot_hold_the_api() {
    use tokio::io::AsyncWriteExt;
    let app =
        TestApp::spawn_with(&[("HTTP_MAX_CONNECTIONS", "40".to_owned()), ("HTTP_HEADER_TIMEOUT_SECS", "3".to_owned())])
            .await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // An idle flood, three times the limit, opened one after the other.
    let mut idle = Vec::new();
    for _ in 0..120 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Accepted after the whole flood: once it is answered, every flood connection was seen.
    ready_on_a_new_connection(&app).await;
    let open: Vec<bool> = closed_by_server(&mut idle).await.into_iter().map(|closed| !closed).collect();
    let still_open = open.iter().filter(|open| **open).count();
    // The limit, less the room the monitor's connection took (it may still be closing).
    assert!((39..=40).contains(&still_open), "{still_open} of the flood's connections are open");
    assert!(open[..80].iter().all(|open| !open), "the oldest idle connections are the ones closed");

    // Slow headers: a byte every 300 ms never makes a request head within the timeout.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"GET /health/live HTTP/1.1\r\n").await.unwrap();
        slow.push(stream);
    }
    let started = std::time::Instant::now();
    let mut closed = vec![false; slow.len()];
    while started.elapsed() < Duration::from_secs(8) && closed.iter().any(|closed| !closed) {
        for (stream, closed) in slow.iter_mut().zip(closed.iter_mut()) {
            *closed |= stream.write_all(b"X").await.is_err();
        }
        for (now, closed) in closed_by_server(&mut slow).await.into_iter().zip(closed.iter_mut()) {
            *closed |= now;
        }
        ready_on_a_new_connection(&app).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed.iter().all(|closed| *closed), "slow-header connections outlived the header timeout");
    assert!(started.elapsed() >= Duration::from_secs(2), "closed before the header timeout");
    // Idle keep-alive connections, past the same timeout, are closed too: the flood is gone.
    assert!(closed_by_server(&mut idle).await.into_iter().all(|closed| closed));
    ready_on_a_new_connection(&app).await;
}

/// Orders of one buyer for an event, by status and reason.
async fn outcomes(app: &TestApp, event: Uuid) -> Vec<(String, Option<String>, i64)> {
    sqlx::query_as("SELECT status, reason, count(*) FROM orders WHERE event_id = $1 GROUP BY 1, 2 ORDER BY 1, 2")
        .bind(event)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

/// Finding 3: with default settings one account took 100/100 tickets of a free event (12
/// orders of 10) and held 100/100 of a paid one (10 orders of 10). Events now get a buyer cap
/// by default (the deployment's, else `max_per_order`), and a capped event takes at most 3
/// unpaid orders per buyer; only `"max_per_buyer": null` sent on purpose lifts both.
#[tokio::test]
async fn one_account_cannot_take_or_hold_a_whole_event_by_default() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let (_, hoarder) = app.user("hoarder").await;
    let create = |overrides: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let res = app.create_event(&admin, overrides).await;
            assert_eq!(res.status, 201, "{}", res.body);
            (res.json["id"].as_str().unwrap().parse::<Uuid>().unwrap(), res.json)
        }
    };
    let stampede = |event: Uuid, orders: usize, quantity: i64| {
        let (app, hoarder) = (&app, hoarder.clone());
        async move {
            let answers =
                futures_util::future::join_all((0..orders).map(|_| app.order(&hoarder, event, quantity, None))).await;
            assert!(answers.iter().all(|res| res.status == 202), "every order is accepted");
        }
    };
    let (free, body) = create(json!({"capacity": 100, "price": "0", "max_per_order": 10})).await;
    assert_eq!(body["max_per_buyer"], 10, "the default cap is the event's max_per_order");
    let (paid, _) = create(json!({"capacity": 100, "max_per_order": 10})).await;
    let (small_holds, _) = create(json!({"capacity": 100, "max_per_order": 1, "max_per_buyer": 10})).await;
    let (uncapped, body) = create(json!({"capacity": 100, "max_per_order": 10, "max_per_buyer": null})).await;
    assert_eq!(body["max_per_buyer"], Value::Null);
    stampede(free, 12, 10).await;
    stampede(paid, 10, 10).await;
    stampede(small_holds, 5, 1).await;
    stampede(uncapped, 3, 10).await;
    app.wait_until_final(Duration::from_secs(30)).await;

    let limit = |n| ("REJECTED".to_owned(), Some("BUYER_LIMIT".to_owned()), n);
    assert_eq!(outcomes(&app, free).await, [("PAID".to_owned(), Some("FREE_ORDER".to_owned()), 1), limit(11)]);
    assert_eq!(outcomes(&app, paid).await, [("PENDING".to_owned(), None, 1), limit(9)]);
    assert_eq!(outcomes(&app, small_holds).await, [("PENDING".to_owned(), None, 3), limit(2)]);
    assert_eq!(outcomes(&app, uncapped).await, [("PENDING".to_owned(), None, 3)]);
    for event in [free, paid, small_holds, uncapped] {
        app.assert_consistent(event).await;
    }

    // An edit keeps the cap, or lifts it when asked to.
    let res = app.patch(&format!("/api/v1/events/{paid}"), &json!({"name": "Renamed"}), Some(&admin)).await;
    assert_eq!((res.status, &res.json["max_per_buyer"]), (200, &json!(10)), "{}", res.body);
    let res = app.patch(&format!("/api/v1/events/{paid}"), &json!({"max_per_buyer": null}), Some(&admin)).await;
    assert_eq!((res.status, &res.json["max_per_buyer"]), (200, &Value::Null), "{}", res.body);
    let res = app.patch(&format!("/api/v1/events/{uncapped}"), &json!({"capacity": 200}), Some(&admin)).await;
    assert_eq!((res.status, &res.json["max_per_buyer"]), (200, &Value::Null), "{}", res.body);
    let res = app.create_event(&admin, json!({"max_per_buyer": 0})).await;
    res.assert_error(422, "validation_failed");
}

/// The deployment's default cap, for events created without one.
#[tokio::test]
async fn the_deployment_sets_the_default_buyer_cap() {
    let app = TestApp::spawn_with(&[("DEFAULT_MAX_PER_BUYER", "6".to_owned())]).await;
    let admin = app.admin().await;
    let res = app.create_event(&admin, json!({"max_per_order": 4})).await;
    assert_eq!((res.status, &res.json["max_per_buyer"]), (201, &json!(6)), "{}", res.body);
    let res = app.create_event(&admin, json!({"max_per_order": 4, "max_per_buyer": 2})).await;
    assert_eq!((res.status, &res.json["max_per_buyer"]), (201, &json!(2)), "{}", res.body);
}

/// Finding 4: EUR→JPY left a 199.50 VIP type selling at 199.50 yen. A currency change that
/// leaves a live type's price inexpressible is refused, naming the types.
#[tokio::test]
async fn a_currency_change_cannot_leave_prices_the_currency_cannot_express() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let res = app.create_event(&admin, json!({"price": "50"})).await;
    let event = res.json["id"].as_str().unwrap().to_owned();
    let types = format!("/api/v1/events/{event}/ticket-types");
    let vip = app.post(&types, &json!({"name": "VIP", "price": "199.50"}), Some(&admin)).await;
    assert_eq!(vip.status, 201, "{}", vip.body);
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"currency": "JPY"}), Some(&admin)).await;
    res.assert_error(422, "invalid_price_for_currency");
    assert!(res.json["error"]["message"].as_str().unwrap().contains("VIP (199.50)"), "{}", res.body);
    let stored: String = sqlx::query_scalar("SELECT currency FROM events WHERE id = $1::uuid")
        .bind(&event)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, "EUR");
    // A whole price, then the change goes through.
    let vip_path = format!("{types}/{}", vip.json["id"].as_str().unwrap());
    assert_eq!(app.patch(&vip_path, &json!({"price": "200"}), Some(&admin)).await.status, 200);
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"currency": "JPY"}), Some(&admin)).await;
    assert_eq!((res.status, res.json["currency"].as_str()), (200, Some("JPY")), "{}", res.body);
    // The event's own price is checked with it, as before.
    let res = app.patch(&format!("/api/v1/events/{event}"), &json!({"price": "10.50"}), Some(&admin)).await;
    res.assert_error(422, "validation_failed");
}

/// Finding 5: 40 buyers leaving the waiting list while 40 tickets were released: 16 got
/// `204` and were still offered tickets (leaving did not take the event's lock, and the
/// offer overwrote `LEFT`). Now a leave answered `204` is never offered, and an entry that
/// was offered first answers 409 `offer_pending`.
#[tokio::test]
async fn leaving_the_waiting_list_never_races_its_offers() {
    let app = TestApp::spawn_with(&worker_decides()).await;
    let _worker = app.worker_with(|c| c.hold_ttl_secs = 3600).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 40, 1).await;
    let holders = app.buyers(40).await;
    let holds =
        futures_util::future::join_all(holders.iter().map(|(_, token)| app.pending_order(token, event, 1))).await;
    let waiters = app.buyers(40).await;
    for (_, token) in &waiters {
        let res = app.post(&format!("/api/v1/events/{event}/waitlist"), &json!({"quantity": 1}), Some(token)).await;
        assert_eq!(res.status, 201, "{}", res.body);
    }
    // Every hold is cancelled while every waiter leaves.
    let app = &app;
    let cancels = holds.iter().zip(&holders).map(|(order, (_, token))| async move {
        app.post(&format!("/api/v1/orders/{order}/cancel"), &json!({}), Some(token)).await.status
    });
    let leaves = waiters
        .iter()
        .map(|(_, token)| async move { app.delete(&format!("/api/v1/events/{event}/waitlist"), Some(token)).await });
    let (cancelled, left) =
        futures_util::future::join(futures_util::future::join_all(cancels), futures_util::future::join_all(leaves))
            .await;
    assert!(cancelled.iter().all(|status| *status == 200), "{cancelled:?}");
    let mut offered = 0;
    for ((waiter, _), res) in waiters.iter().zip(&left) {
        let (status, order): (String, Option<Uuid>) =
            sqlx::query_as("SELECT status, order_id FROM waitlist_entries WHERE event_id = $1 AND user_id = $2")
                .bind(event)
                .bind(waiter)
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE event_id = $1 AND user_id = $2")
            .bind(event)
            .bind(waiter)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        match res.status {
            204 => assert_eq!((status.as_str(), order, orders), ("LEFT", None, 0), "a buyer who left was offered"),
            _ => {
                res.assert_error(409, "offer_pending");
                assert_eq!((status.as_str(), order.is_some(), orders), ("OFFERED", true, 1));
                offered += 1;
            }
        }
    }
    let sold: i64 = sqlx::query_scalar("SELECT sold FROM events WHERE id = $1")
        .bind(event)
        .fetch_one(&app.db.pool)
        .await
        .map(|sold: i32| i64::from(sold))
        .unwrap();
    assert_eq!(sold, offered, "the released tickets went to the offers that were made, and only to them");
    app.assert_consistent(event).await;
}

/// Finding 6: concurrent joins to different events passed the 50-open-entries limit (52):
/// each counted before the others' inserts. The count is taken under the buyer's lock.
#[tokio::test]
async fn the_open_entries_limit_holds_under_concurrent_joins() {
    let app = TestApp::spawn().await;
    let admin = app.admin().await;
    let mut events = Vec::new();
    for _ in 0..60 {
        events.push(app.event_with(&admin, 1, 1).await);
    }
    // Sold out without orders (only the waiting list's admission reads it here).
    sqlx::query("UPDATE events SET sold = capacity WHERE id = ANY($1)")
        .bind(&events)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (buyer, token) = app.user("ada").await;
    let app = &app;
    let joins = events.iter().map(|event| {
        let token = token.clone();
        async move { app.post(&format!("/api/v1/events/{event}/waitlist"), &json!({"quantity": 1}), Some(&token)).await }
    });
    let answers = futures_util::future::join_all(joins).await;
    let joined = answers.iter().filter(|res| res.status == 201).count();
    for res in answers.iter().filter(|res| res.status != 201) {
        res.assert_error(409, "too_many_entries");
    }
    assert_eq!(joined, 50);
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM waitlist_entries WHERE user_id = $1")
        .bind(buyer)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(open, 50);
}

/// Finding 7: the request line logged the raw path, so 400 requests of 60 KB paths wrote
/// 24 MB of logs in 0.1 s. A line now carries the route template and at most 200 bytes of
/// the path.
#[tokio::test]
async fn long_paths_do_not_amplify_the_logs() {
    let app = TestApp::spawn_process().await;
    let long = format!("/api/v1/events/{}", "a".repeat(60_000));
    for _ in 0..20 {
        assert_eq!(app.get(&long, None).await.status, 404);
    }
    let event = Uuid::now_v7();
    app.get(&format!("/api/v1/events/{event}"), None).await.assert_error(404, "not_found");
    // The lines are read as the process wrote them, after it is done with these requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = app.api_logs();
    let longest = logs.iter().map(|line| line.to_string().len()).max().unwrap();
    assert!(longest < 2_000, "a log line of {longest} bytes");
    let routed = logs
        .iter()
        .filter(|line| line.to_string().contains(&event.to_string()))
        .find(|line| line.to_string().contains("/api/v1/events/{id}"));
    assert!(routed.is_some(), "the request's line names its route template");
}

/// The port of each URL in `urls` (comma-separated).
fn ports_of(urls: &str) -> Vec<u16> {
    urls.split(',').filter_map(|url| url::Url::parse(url.trim()).ok()?.port()).collect()
}

/// Finding 8: `make run` left RabbitMQ's epmd and Erlang distribution port listening on every
/// interface (`0.0.0.0:4380`, `0.0.0.0:25680`). Every port of the local services listens on
/// loopback only (read from the kernel's socket tables, as `ss -ltn` does).
#[tokio::test]
async fn the_local_services_listen_on_loopback_only() {
    let services = tests::Services::from_env();
    let mut ports = vec![4380, 25680];
    ports.extend(ports_of(&services.database_url));
    ports.extend(ports_of(&services.amqp_url));
    ports.extend(ports_of(&services.management_urls.join(",")));
    let mut listening = Vec::new();
    for (table, loopback) in [("/proc/net/tcp", "0100007F"), ("/proc/net/tcp6", "00000000000000000000000001000000")] {
        let text = std::fs::read_to_string(table).unwrap();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A")) = (fields.get(1), fields.get(3)) else { continue };
            let (address, port) = local.split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            if ports.contains(&port) {
                listening.push((port, address == loopback, format!("{table} {address}")));
            }
        }
    }
    for port in [4380, 25680] {
        assert!(listening.iter().any(|(p, ..)| *p == port), "nothing listens on {port}: {listening:?}");
    }
    let exposed: Vec<_> = listening.iter().filter(|(_, loopback, _)| !loopback).collect();
    assert!(exposed.is_empty(), "listening beyond loopback: {exposed:?}");
}

/// Finding 9: one user registered the same URL ten times, turning each order into twenty
/// POSTs to a third party. A URL is registered once per user (409 `endpoint_exists`), and a
/// worker sends at most 4 deliveries to one host at once, whoever registered them.
#[tokio::test]
async fn webhooks_cannot_be_turned_into_a_flood_at_one_host() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    // A slow third party that counts the requests it is sent at once.
    let (now, most, total) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (now, most, total) = (now.clone(), most.clone(), total.clone());
        move || {
            let (now, most, total) = (now.clone(), most.clone(), total.clone());
            async move {
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                total.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::NO_CONTENT
            }
        }
    };
    let router = axum::Router::new().route("/hooks/{n}", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 1).await;
    let (_, token) = app.user("reflector").await;
    let register = |url: String| {
        let (app, token) = (&app, token.clone());
        async move { app.post("/api/v1/webhook-endpoints", &json!({"url": url}), Some(&token)).await }
    };
    assert_eq!(register(format!("{target}/hooks/0")).await.status, 201);
    register(format!("{target}/hooks/0")).await.assert_error(409, "endpoint_exists");
    // Ten URLs on one host: allowed, but their deliveries take turns.
    for n in 1..10 {
        assert_eq!(register(format!("{target}/hooks/{n}")).await.status, 201);
    }
    let order = app.pending_order(&token, event, 1).await;
    // order.queued and order.pending, to each of the ten endpoints.
    for _ in 0..200 {
        if total.load(Ordering::SeqCst) >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total.load(Ordering::SeqCst), 20, "every delivery of order {order} arrives");
    assert_eq!(most.load(Ordering::SeqCst), 4, "at most 4 at once to one host");
}
