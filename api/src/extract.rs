//! axum's extractors, with rejections turned into the API's JSON errors instead of axum's
//! plain-text bodies.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::error::ApiError;

/// JSON body: 400 malformed, 422 wrong shape, 413 too large, 415 wrong content type.
///
/// Unlike `axum::Json`, well-formed JSON of the wrong shape is always 422: serde_json
/// reports some shape errors (`null` where an enum is expected) as syntax errors, so a
/// syntax error is checked against the body read as any JSON at all.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(&request) {
            return Err(ApiError::UnsupportedMediaType(
                "expected a request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| match rejection.status() {
            axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            _ => ApiError::BadRequest { code: "bad_request", message: rejection.body_text() },
        })?;
        from_json(&bytes).map(Json)
    }
}

/// Reads a JSON body: 400 `malformed_json` when it is not JSON, 422 `invalid_body` when it is
/// JSON of the wrong shape.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(value)) => Ok(value),
        Err(JsonRejection::JsonSyntaxError(err)) if serde_json::from_slice::<IgnoredAny>(bytes).is_ok() => {
            Err(ApiError::invalid("invalid_body", err.body_text()))
        }
        Err(rejection) => Err(rejection.into()),
    }
}

/// `application/json`, or any `application/*+json`, as axum's own extractor accepts.
fn is_json(request: &Request) -> bool {
    let Some(content_type) = request.headers().get(CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence.strip_prefix("application/").is_some_and(|subtype| subtype == "json" || subtype.ends_with("+json"))
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters: anything that does not parse is a 404.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// Query string: 400 when it does not parse.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);
