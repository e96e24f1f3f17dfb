//! The api's metrics: the HTTP middleware that measures every request by route template,
//! and the descriptions of everything the api records (`common::metrics` installs the
//! recorder and serves `/metrics` on `METRICS_ADDR`).

use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::{Method, Request, Response};
use futures_util::future::BoxFuture;
use tower::Service;

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
    describe_histogram!(
        "turnstile_accept_batch_duration_seconds",
        metrics::Unit::Seconds,
        "How long the order inserter took to store one batch and answer its requests (its statements and their commit)."
    );
    describe_gauge!(
        "turnstile_long_polls_waiting",
        "GET /orders/{id}?wait=N requests waiting for their order to change."
    );
    describe_counter!(
        "turnstile_rate_limited_total",
        "Requests refused with 429, by limit (login_account, login_address, signup)."
    );
    describe_counter!(
        "turnstile_waitlist_offers_total",
        "Waiting-list offers made from tickets this process released (a cancel, a declined payment, a refund, capacity raised)."
    );
    describe_gauge!("turnstile_http_connections", "Client connections open now (at most HTTP_MAX_CONNECTIONS).");
    describe_counter!(
        "turnstile_http_connections_closed_total",
        "Client connections the api closed to stay within HTTP_MAX_CONNECTIONS, by reason: idle_at_limit (the connection idle the longest, to make room), limit (a new one, every connection having a request in flight)."
    );
    describe_counter!(
        "turnstile_catalog_reads_total",
        "Events read into the api's memory of events on sale, by what read them: announcement (an event created or changed, read before anyone asks for it) or lookup (a request for an event not in memory)."
    );
    describe_gauge!("turnstile_catalog_events", "Events in the api's memory of events on sale.");
    metrics::counter!("turnstile_waitlist_offers_total").increment(0);
    for by in ["announcement", "lookup"] {
        metrics::counter!("turnstile_catalog_reads_total", "by" => by).increment(0);
    }
    metrics::gauge!("turnstile_catalog_events").set(0.0);
    metrics::gauge!("turnstile_http_connections").set(0.0);
    for reason in ["idle_at_limit", "limit"] {
        metrics::counter!("turnstile_http_connections_closed_total", "reason" => reason).increment(0);
    }
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

/// Outermost layer: measures every request, including those refused before routing (a
/// time-out, an unknown path: `http_route="unmatched"`). A plain service wrapper rather
/// than `middleware::from_fn`, which clones the whole stack below it on every request.
pub fn track<S>(inner: S) -> Track<S> {
    Track { inner }
}

#[derive(Clone)]
pub struct Track<S> {
    inner: S,
}

impl<S, B> Service<Request<Body>> for Track<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.method());
        let active = Active::start(method);
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            drop(active);
            if let Ok(response) = &result {
                let route = response.extensions().get::<Route>().map_or("unmatched", |route| route.0.as_str());
                metrics::histogram!(
                    "http_server_request_duration_seconds",
                    "http_request_method" => method,
                    "http_route" => route.to_owned(),
                    "http_response_status_code" => response.status().as_str().to_owned(),
                )
                .record(started.elapsed().as_secs_f64());
            }
            result
        })
    }
}

/// On every route (after routing): hands the matched route template to [`Track`].
pub fn route<S>(inner: S) -> RouteTag<S> {
    RouteTag { inner }
}

#[derive(Clone)]
pub struct RouteTag<S> {
    inner: S,
}

impl<S, B> Service<Request<Body>> for RouteTag<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let matched = request.extensions().get::<MatchedPath>().cloned();
        if let Some(matched) = &matched {
            // The request's span (`routes::request_span`) logs the route template.
            tracing::Span::current().record("route", matched.as_str());
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut result = response.await;
            if let (Ok(response), Some(matched)) = (&mut result, matched) {
                response.extensions_mut().insert(Route(matched));
            }
            result
        })
    }
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
