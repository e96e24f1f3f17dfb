//! At the door and on the poster: ticket check-in codes (signed, verified without a lookup,
//! scanned once) and event images (recognised by content, size-limited, served cacheable).

use base64::Engine as _;
use futures_util::future::join_all;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use tests::{TICKET_SECRET, TestApp};
use uuid::Uuid;

/// A ticket's code computed here, independently of the api: what an attacker who knew the
/// key could make, and what the door scanner reads.
fn code_for(ticket: Uuid) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(TICKET_SECRET.as_bytes()).unwrap();
    mac.update(b"turnstile-ticket-v1:");
    mac.update(ticket.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("{}.{}", ticket.simple(), base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..16]))
}

async fn tickets_of(app: &TestApp, token: &str, order: Uuid) -> Vec<Value> {
    let res = app.get(&format!("/api/v1/orders/{order}"), Some(token)).await;
    assert_eq!(res.status, 200, "{}", res.body);
    res.json["tickets"].as_array().unwrap().clone()
}

#[tokio::test]
async fn paid_tickets_check_in_exactly_once() {
    let app = TestApp::spawn().await;
    let _worker = app.worker().await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let buyers = app.buyers(2).await;
    let (buyer, other) = (buyers[0].1.as_str(), buyers[1].1.as_str());

    // No code before payment, and the QR route says why.
    let order = app.pending_order(buyer, event, 2).await;
    let tickets = tickets_of(&app, buyer, order).await;
    assert!(tickets.iter().all(|t| t.get("code").is_none()), "{tickets:?}");
    let first: Uuid = tickets[0]["id"].as_str().unwrap().parse().unwrap();
    app.get(&format!("/api/v1/tickets/{first}/qr.png"), Some(buyer)).await.assert_error(422, "not_paid");
    let unpaid = app.post("/api/v1/check-ins", &json!({"code": code_for(first)}), Some(&admin)).await;
    unpaid.assert_error(422, "not_paid");

    assert_eq!(app.payment(order, &json!({"status": "PAID"})).await.status, 204);
    let tickets = tickets_of(&app, buyer, order).await;
    let codes: Vec<String> =
        tickets.iter().map(|t| t["code"].as_str().expect("a paid ticket has a code").to_owned()).collect();
    for (ticket, code) in tickets.iter().zip(&codes) {
        assert_eq!(*code, code_for(ticket["id"].as_str().unwrap().parse().unwrap()));
    }

    // The QR image, for the holder only.
    let qr =
        app.client.get(app.url(&format!("/api/v1/tickets/{first}/qr.png"))).bearer_auth(buyer).send().await.unwrap();
    assert_eq!(qr.status(), 200);
    assert_eq!(qr.headers()["content-type"], "image/png");
    let png = qr.bytes().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 100, "a PNG image");
    app.get(&format!("/api/v1/tickets/{first}/qr.png"), Some(other)).await.assert_error(404, "not_found");

    // Scanning: admins only; the first scan wins, later ones say when it was.
    app.post("/api/v1/check-ins", &json!({"code": codes[0]}), Some(buyer)).await.assert_error(403, "forbidden");
    let scan = app.post("/api/v1/check-ins", &json!({"code": codes[0]}), Some(&admin)).await;
    assert_eq!(scan.status, 200, "{}", scan.body);
    assert_eq!(scan.json["ticket_id"], first.to_string());
    assert_eq!(
        (scan.json["event_id"].as_str(), scan.json["event_name"].as_str()),
        (Some(event.to_string().as_str()), Some("Turnstile Live"))
    );
    assert_eq!(scan.json["holder_name"], "Buyer");
    assert_eq!(scan.json["ticket_type"], "General admission", "door staff see what the ticket admits to");
    let again = app.post("/api/v1/check-ins", &json!({"code": codes[0]}), Some(&admin)).await;
    again.assert_error(409, "already_checked_in");
    assert_eq!(again.json["error"]["checked_in_at"], scan.json["checked_in_at"]);

    // Twenty doors scan the second ticket at once: exactly one lets it in.
    let body = json!({"code": codes[1]});
    let scans = join_all((0..20).map(|_| app.post("/api/v1/check-ins", &body, Some(&admin)))).await;
    let admitted: Vec<&tests::Response> = scans.iter().filter(|r| r.status == 200).collect();
    assert_eq!(admitted.len(), 1, "{:?}", scans.iter().map(|r| r.status).collect::<Vec<_>>());
    for refused in scans.iter().filter(|r| r.status != 200) {
        refused.assert_error(409, "already_checked_in");
        assert_eq!(refused.json["error"]["checked_in_at"], admitted[0].json["checked_in_at"]);
    }

    // Forged and altered codes are unknown.
    let mut altered = codes[1].clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    let forged = format!("{}.{}", Uuid::now_v7().simple(), codes[1].split_once('.').unwrap().1);
    for bad in [altered.as_str(), forged.as_str(), "not a code", ""] {
        app.post("/api/v1/check-ins", &json!({"code": bad}), Some(&admin)).await.assert_error(404, "not_found");
    }
    // A valid code for a ticket that does not exist is unknown too.
    app.post("/api/v1/check-ins", &json!({"code": code_for(Uuid::now_v7())}), Some(&admin))
        .await
        .assert_error(404, "not_found");

    // A cancelled ticket (payment declined) and a ticket of a deleted event do not get in.
    let declined = app.pending_order(other, event, 1).await;
    assert_eq!(app.payment(declined, &json!({"status": "REJECTED"})).await.status, 204);
    let cancelled: Uuid = tickets_of(&app, other, declined).await[0]["id"].as_str().unwrap().parse().unwrap();
    let res = app.post("/api/v1/check-ins", &json!({"code": code_for(cancelled)}), Some(&admin)).await;
    res.assert_error(422, "ticket_cancelled");
    // (The API refuses to delete an event with paid orders; an operator's SQL can still.)
    sqlx::query("UPDATE events SET deleted_at = now() WHERE id = $1").bind(event).execute(&app.db.pool).await.unwrap();
    let second: Uuid = tickets[1]["id"].as_str().unwrap().parse().unwrap();
    sqlx::query("DELETE FROM check_ins WHERE ticket_id = $1").bind(second).execute(&app.db.pool).await.unwrap();
    let res = app.post("/api/v1/check-ins", &json!({"code": codes[1]}), Some(&admin)).await;
    res.assert_error(422, "event_unavailable");
}

/// A 1×1 PNG, written by hand.
const PNG: &[u8] = b"\x89PNG\x0d\x0a\x1a\x0a\x00\x00\x00\x0dIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\x0dIDATx\x9cc\xf8\xff\xff\xbf=\x00\x09;\x03=&\xd6id\x00\x00\x00\x00IEND\xaeB`\x82";

/// A small picture encoded as `format` (the api decodes every upload whole).
fn picture(format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(4, 3, image::Rgb([200, 30, 90])).write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

async fn upload(
    app: &TestApp,
    token: &str,
    event: Uuid,
    field: &str,
    file_name: &str,
    bytes: &[u8],
) -> tests::Response {
    let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(file_name.to_owned());
    let form = reqwest::multipart::Form::new().part(field.to_owned(), part);
    let res = app
        .client
        .put(app.url(&format!("/api/v1/events/{event}/image")))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    tests::Response::from(res).await
}

#[tokio::test]
async fn event_images_are_recognised_by_content_and_served_cacheable() {
    let app = TestApp::spawn_with(&[("IMAGE_MAX_BYTES", "4096".to_owned())]).await;
    let admin = app.admin().await;
    let event = app.event_with(&admin, 10, 4).await;
    let path = format!("/api/v1/events/{event}/image");
    app.get(&path, None).await.assert_error(404, "not_found");

    let res = upload(&app, &admin, event, "image", "poster.bin", PNG).await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json["image_url"], path);
    let served = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "image/png");
    assert!(served.headers()["cache-control"].to_str().unwrap().contains("max-age"));
    let etag = served.headers()["etag"].to_str().unwrap().to_owned();
    // Stored encoded anew: the same pixels (issue 29: nothing but the pixels is kept).
    let pixels = |bytes: &[u8]| image::load_from_memory(bytes).unwrap().to_rgba8();
    assert_eq!(pixels(served.bytes().await.unwrap().as_ref()), pixels(PNG));
    let cached = app.client.get(app.url(&path)).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(cached.status(), 304);
    // Issue 29, finding 10: a PNG with HTML appended was stored and served as uploaded; only
    // the image is kept now.
    let polyglot = [PNG, b"<html><script>alert(1)</script></html>".as_slice()].concat();
    assert_eq!(upload(&app, &admin, event, "image", "poster.png", &polyglot).await.status, 200);
    let served = app.client.get(app.url(&path)).send().await.unwrap().bytes().await.unwrap();
    assert!(!served.windows(6).any(|w| w == b"<html>"), "the appended HTML was served");
    assert_eq!(pixels(&served), pixels(PNG));

    // Recognised by content, whatever the name says; replacing drops the old file.
    for (format, content_type) in [(image::ImageFormat::Jpeg, "image/jpeg"), (image::ImageFormat::WebP, "image/webp")] {
        let bytes = &picture(format)[..];
        let res = upload(&app, &admin, event, "image", "poster.png", bytes).await;
        assert_eq!(res.status, 200, "{content_type}: {}", res.body);
        let served = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(served.headers()["content-type"], content_type);
        assert_ne!(served.headers()["etag"].to_str().unwrap(), etag, "a new upload has a new ETag");
        // Encoded anew in its format (a JPEG's pixels may differ slightly).
        let served = served.bytes().await.unwrap();
        assert_eq!(image::guess_format(&served).unwrap(), format);
        let (uploaded, served) = (image::load_from_memory(bytes).unwrap(), image::load_from_memory(&served).unwrap());
        assert_eq!((served.width(), served.height()), (uploaded.width(), uploaded.height()));
    }
    let stored = std::fs::read_dir(app.images.join("events").join(event.to_string())).unwrap().count();
    assert_eq!(stored, 1, "replaced images are deleted");

    let res = upload(&app, &admin, event, "image", "poster.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>").await;
    res.assert_error(415, "unsupported_media_type");
    let mut big = PNG.to_vec();
    big.resize(8192, 0);
    upload(&app, &admin, event, "image", "big.png", &big).await.assert_error(413, "payload_too_large");
    upload(&app, &admin, event, "picture", "poster.png", PNG).await.assert_error(400, "invalid_upload");
    let buyer = app.buyers(1).await;
    upload(&app, &buyer[0].1, event, "image", "poster.png", PNG).await.assert_error(403, "forbidden");
    upload(&app, &admin, Uuid::now_v7(), "image", "poster.png", PNG).await.assert_error(404, "not_found");
    let served = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(served.headers()["content-type"], "image/webp", "refused uploads changed nothing");
}
