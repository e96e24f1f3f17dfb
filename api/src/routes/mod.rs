//! The HTTP surface: one module per resource, assembled here with the middleware every
//! request goes through.

pub mod accounts;
pub mod events;
pub mod health;
mod input;
pub mod me;
pub mod orders;
pub mod organizer;
mod page;
pub mod payments;
pub mod promo_codes;
pub mod ticket_types;
pub mod tickets;
pub mod users;
pub mod waitlist;
pub mod webhook_endpoints;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, header};
use axum::response::IntoResponse;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::{self, ApiError};
use crate::state::AppState;
use crate::{observability, openapi};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The Swagger UI's address for clients of the Go API, which served it at
/// `/api/v1/swagger/index.html`.
async fn to_swagger_ui() -> axum::response::Redirect {
    axum::response::Redirect::permanent("/docs/")
}

/// Every route of the API, with the OpenAPI document of the same declarations: a route
/// cannot be served without being documented (or documented without being served).
/// `image_max_bytes`: the body limit of image uploads.
pub fn api(image_max_bytes: u64) -> OpenApiRouter<AppState> {
    let v1 = OpenApiRouter::new()
        .merge(accounts::router())
        .merge(me::router())
        .merge(events::router(image_max_bytes))
        .merge(orders::router())
        .merge(organizer::router())
        .merge(payments::router())
        .merge(promo_codes::router())
        .merge(webhook_endpoints::router())
        .merge(users::router())
        .merge(tickets::router())
        .merge(ticket_types::router())
        .merge(waitlist::router())
        // The Go API documented its Swagger UI here; it lives at /docs (redirects, not in
        // the document).
        .route("/swagger", axum::routing::get(to_swagger_ui))
        .route("/swagger/", axum::routing::get(to_swagger_ui))
        .route("/swagger/index.html", axum::routing::get(to_swagger_ui));
    OpenApiRouter::with_openapi(openapi::base()).nest("/api/v1", v1).merge(health::router())
}

/// Builds the whole application: routes, docs, fallbacks and middleware.
pub fn app(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.body_limit_bytes).unwrap_or(usize::MAX);
    let timeout = state.config.request_timeout();
    let (routes, document) = api(state.config.image_max_bytes).split_for_parts();
    routes
        .merge(SwaggerUi::new("/docs").url("/api/v1/openapi.json", openapi::finish(document)))
        .route_layer(tower::layer::layer_fn(observability::route))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower::util::option_layer(cors(&state.config.cors_allowed_origins)))
        // Outermost first: every request is measured (`http_server_request_duration_seconds`,
        // by route template); every response carries the security headers; panics become JSON
        // 500s; every request gets an `x-request-id` (the client's if it sent a short,
        // printable one) that is logged on its span and echoed back; the Authorization
        // header never reaches the logs; a request past the time limit gets a JSON 503.
        .layer(
            ServiceBuilder::new()
                .layer(tower::layer::layer_fn(observability::track))
                .layer(security_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .layer(security_header(header::X_FRAME_OPTIONS, "DENY"))
                .layer(security_header(header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"))
                .layer(security_header(header::REFERRER_POLICY, "no-referrer"))
                .layer(CatchPanicLayer::custom(|_| {
                    tracing::error!("handler panicked");
                    ApiError::Internal(anyhow::anyhow!("panic")).into_response()
                }))
                .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION, header::COOKIE]))
                .layer(axum::middleware::map_request(drop_unusable_request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(DefaultOnResponse::new().level(Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async { ApiError::Timeout }))
                .layer(tower::timeout::TimeoutLayer::new(timeout)),
        )
        .with_state(state)
}

/// CORS for the origins in `CORS_ALLOWED_ORIGINS` (none by default: no CORS headers, so a
/// browser page on another origin cannot read the answers). Tokens travel in the
/// `Authorization` header, never in cookies, so credentials mode stays off.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any};
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            orders::IDEMPOTENCY_KEY,
            REQUEST_ID,
            HeaderName::from_static(common::telemetry::TRACEPARENT),
        ])
        .expose_headers([
            header::LOCATION,
            header::LINK,
            header::RETRY_AFTER,
            header::ETAG,
            REQUEST_ID,
            orders::IDEMPOTENT_REPLAYED,
            HeaderName::from_static("x-next-cursor"),
        ])
        .max_age(std::time::Duration::from_secs(600));
    Some(layer)
}

/// A header every response carries (unless the handler set it): the API serves JSON and
/// images, never pages to be framed, sniffed into HTML, or leak their URL as a referrer.
fn security_header(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
}

/// The longest client `x-request-id` kept; longer ones are replaced by a fresh id.
const REQUEST_ID_MAX_LEN: usize = 128;

/// Drops a client's `x-request-id` that is too long or not printable ASCII, so that a fresh
/// one is made: the id is logged on every line of the request and echoed back.
async fn drop_unusable_request_id(mut request: Request<Body>) -> Request<Body> {
    let usable = |value: &HeaderValue| {
        value.len() <= REQUEST_ID_MAX_LEN && value.as_bytes().iter().all(|b| b.is_ascii_graphic())
    };
    if request.headers().get(REQUEST_ID).is_some_and(|value| !usable(value)) {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// A `Location` header pointing at `path` (a created or accepted resource).
pub(crate) fn location(path: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(path) {
        headers.insert(header::LOCATION, value);
    }
    headers
}

/// The longest part of a request's path that its log lines carry: a client chooses the
/// path, and a 60 KB one on every line of its request would let it fill the logs.
const LOGGED_PATH_MAX: usize = 200;

/// At most [`LOGGED_PATH_MAX`] bytes of `path` (cut at a character boundary), with `…` when
/// cut.
fn logged_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= LOGGED_PATH_MAX {
        return path.into();
    }
    let cut = (0..=LOGGED_PATH_MAX).rev().find(|i| path.is_char_boundary(*i)).unwrap_or(0);
    format!("{}…", &path[..cut]).into()
}

/// The span of one request: its id, its route template (`route`, once routed; the path
/// itself only up to [`LOGGED_PATH_MAX`] bytes), and its trace (the client's W3C
/// `traceparent` continued when it sent a valid one, else a new trace), whose id every log
/// line of the request carries as `trace_id`; a purchase records the order it created as
/// `order_id`.
fn request_span(request: &Request<Body>) -> tracing::Span {
    let request_id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route = tracing::field::Empty,
        path = %logged_path(request.uri().path()),
        request_id,
        trace_id = tracing::field::Empty,
        order_id = tracing::field::Empty,
    );
    let parent = request.headers().get(common::telemetry::TRACEPARENT).and_then(|v| v.to_str().ok());
    common::telemetry::continue_trace(&span, parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_for_the_logs() {
        assert_eq!(logged_path("/api/v1/events"), "/api/v1/events");
        let long = format!("/{}", "é".repeat(30_000));
        let logged = logged_path(&long);
        assert!(logged.len() <= LOGGED_PATH_MAX + '…'.len_utf8() && logged.ends_with('…'), "{}", logged.len());
    }
}
