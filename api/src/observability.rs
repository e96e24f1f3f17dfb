//! The api's metrics: the HTTP middleware that measures every request by route template,
//! and the descriptions of everything the api records (`common::metrics` installs the
//! recorder and serves `/metrics` on `METRICS_ADDR`).

use std::time::Instant;

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::{Method, Request};
use axum::middleware::Next;
use axum::response::Response;

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "http_server_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP requests by method, route template and status, and how long they took (the count is the request count)."
    );
    describe_gauge!("http_server_active_requests", "HTTP requests being served now, by method.");
    describe_counter!(
        "turnstile_purchase_requests_total",
        "POST /orders by outcome: accepted (stored and sent), sold_out (the fast path), idempotent_replay, rejected (refused input, 4xx), unavailable (5xx)."
    );
    describe_histogram!(
        "turnstile_accept_batch_orders",
        "Orders stored by one INSERT of the order inserter (and sent in one message per partition)."
    );
    describe_gauge!(
        "turnstile_long_polls_waiting",
        "GET /orders/{id}?wait=N requests waiting for their order to change."
    );
    describe_counter!(
        "turnstile_rate_limited_total",
        "Requests refused with 429, by limit (login_account, login_address, signup)."
    );
    for outcome in ["accepted", "sold_out", "idempotent_replay", "rejected", "unavailable"] {
        metrics::counter!("turnstile_purchase_requests_total", "outcome" => outcome).increment(0);
    }
    for limit in ["login_account", "login_address", "signup"] {
        metrics::counter!("turnstile_rate_limited_total", "limit" => limit).increment(0);
    }
    metrics::gauge!("turnstile_long_polls_waiting").set(0.0);
}

/// The route template of the request that produced a response, passed from the inner
/// middleware (which runs after routing) to the outer one (which sees every request).
#[derive(Clone)]
struct Route(MatchedPath);

/// Outermost: measures every request, including those refused before routing (a time-out,
/// an unknown path: `http_route="unmatched"`).
pub async fn track(request: Request<Body>, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let active = Active::start(method);
    let response = next.run(request).await;
    drop(active);
    let route = response.extensions().get::<Route>().map_or("unmatched", |route| route.0.as_str()).to_owned();
    metrics::histogram!(
        "http_server_request_duration_seconds",
        "http_request_method" => method,
        "http_route" => route,
        "http_response_status_code" => response.status().as_str().to_owned(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// On every route (after routing): hands the matched route template to [`track`].
pub async fn route(request: Request<Body>, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(Route(matched));
    }
    response
}

/// The method as OpenTelemetry labels it: the standard ones by name, anything else `_OTHER`
/// (so that made-up methods cannot create series).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// Counts a request in `http_server_active_requests` while it lives (a request dropped
/// because its client went away is uncounted too).
struct Active(&'static str);

impl Active {
    fn start(method: &'static str) -> Self {
        metrics::gauge!("http_server_active_requests", "http_request_method" => method).increment(1.0);
        Self(method)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        metrics::gauge!("http_server_active_requests", "http_request_method" => self.0).decrement(1.0);
    }
}

/// Counts a long-poll in `turnstile_long_polls_waiting` while it waits.
pub struct LongPoll;

impl LongPoll {
    pub fn start() -> Self {
        metrics::gauge!("turnstile_long_polls_waiting").increment(1.0);
        Self
    }
}

impl Drop for LongPoll {
    fn drop(&mut self) {
        metrics::gauge!("turnstile_long_polls_waiting").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "_OTHER");
    }
}
