//! An event's image: uploaded by an admin, served to everyone.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{Event, load_event};
use crate::auth::AdminUser;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Json, Path};
use crate::state::AppState;

/// The content types accepted for event images, recognised from the bytes.
const IMAGE_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];
/// The widest or tallest image accepted, in pixels.
const IMAGE_MAX_SIDE: u32 = 8_000;
/// The most pixels an image may have (25 megapixels: 100 MB decoded as 8-bit RGBA).
const IMAGE_MAX_PIXELS: u64 = 25_000_000;

/// Decodes the whole image (of the type its first bytes claim) within bounds on its
/// dimensions and on the memory decoding may take: a file that only starts like an image
/// (a PNG signature in front of HTML) is 415, one that claims more pixels than allowed 422
/// `image_too_large`, before anything is stored. Returns the image encoded anew in its
/// format, which is what is stored and served: only its pixels (turned as its EXIF
/// orientation says), never bytes appended to it or its metadata (a photo's location).
/// CPU-heavy: run it as `HeavyWork`.
fn check_image(bytes: &[u8], content_type: &str) -> Result<Vec<u8>, ApiError> {
    use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
    let format = match content_type {
        "image/png" => ImageFormat::Png,
        "image/jpeg" => ImageFormat::Jpeg,
        _ => ImageFormat::WebP,
    };
    let too_large = || {
        ApiError::invalid(
            "image_too_large",
            format!("images may be at most {IMAGE_MAX_SIDE} pixels wide and high and {IMAGE_MAX_PIXELS} pixels in all"),
        )
    };
    let refused = |err: ImageError| match err {
        ImageError::Limits(_) => too_large(),
        err => ApiError::UnsupportedMediaType(format!("the file is not a readable PNG, JPEG or WebP image: {err}")),
    };
    let reader = || {
        let mut limits = Limits::default();
        limits.max_image_width = Some(IMAGE_MAX_SIDE);
        limits.max_image_height = Some(IMAGE_MAX_SIDE);
        limits.max_alloc = Some(IMAGE_MAX_PIXELS * 4 + 16 * 1024 * 1024);
        let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
        reader.limits(limits);
        reader
    };
    let (width, height) = reader().into_dimensions().map_err(refused)?;
    if u64::from(width) * u64::from(height) > IMAGE_MAX_PIXELS {
        return Err(too_large());
    }
    let mut decoder = reader().into_decoder().map_err(refused)?;
    let orientation = decoder.orientation().map_err(refused)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(refused)?;
    image.apply_orientation(orientation);
    let mut encoded = std::io::Cursor::new(Vec::new());
    let written = match format {
        // Quality 90: a re-encoded photo keeps its look.
        ImageFormat::Jpeg => {
            image.to_rgb8().write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 90))
        }
        // PNG and (lossless) WebP keep every pixel.
        format => image.write_to(&mut encoded, format),
    };
    written.map_err(|err| ApiError::Internal(anyhow::anyhow!("encoding an uploaded image again: {err}")))?;
    Ok(encoded.into_inner())
}

// The form of `PUT /events/{id}/image`, for the API document (Swagger UI shows a file
// picker for it); the handler reads the multipart stream itself.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ImageUpload {
    /// PNG, JPEG or WebP.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// The router of `PUT /events/{id}/image`, with a body limit of its own (images are larger
/// than the JSON bodies everything else takes).
pub(super) fn upload_router(max_bytes: u64) -> OpenApiRouter<AppState> {
    // Room for the multipart framing around the file.
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX).saturating_add(16 * 1024);
    OpenApiRouter::new().routes(routes!(upload_image)).layer(axum::extract::DefaultBodyLimit::max(limit))
}

/// Upload the event's image (admin): multipart form data with the file in a field named
/// `image`. PNG, JPEG and WebP are accepted, recognised by their content (not the file name
/// or the declared type), decoded whole and stored encoded anew (so only the pixels are kept:
/// nothing appended to the file, no metadata such as a photo's location); larger than
/// `IMAGE_MAX_BYTES` is 413, more than 8000 pixels a side or 25 megapixels 422. The event's `image_url`
/// then points at `GET /api/v1/events/{id}/image`.
#[utoipa::path(put, path = "/events/{id}/image", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")), security(("bearer" = [])),
    request_body(content = inline(ImageUpload), content_type = "multipart/form-data",
        description = "Field `image`: the file"),
    responses(
        (status = 200, description = "The event with its new `image_url`", body = Event),
        (status = 400, description = "Not multipart, or no `image` field (`invalid_upload`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Caller is not an admin", body = ErrorBody),
        (status = 404, description = "No such event (or deleted)", body = ErrorBody),
        (status = 413, description = "Image larger than IMAGE_MAX_BYTES", body = ErrorBody),
        (status = 415, description = "Not a readable PNG, JPEG or WebP image (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "More than 8000 pixels wide or high, or more than 25 megapixels \
            (`image_too_large`)", body = ErrorBody),
        (status = 503, description = "The image store is unavailable", body = ErrorBody),
    ))]
pub async fn upload_image(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<Uuid>,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Event>, ApiError> {
    let bad = |message: String| ApiError::BadRequest { code: "invalid_upload", message };
    let mut multipart = multipart.map_err(|err| bad(err.body_text()))?;
    load_event(&state.db, id, false).await?;
    let too_large = |err: &axum::extract::multipart::MultipartError| err.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let bytes = loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|err| if too_large(&err) { ApiError::PayloadTooLarge } else { bad(err.body_text()) })?
            .ok_or_else(|| bad("no field named `image` in the form".into()))?;
        if field.name() == Some("image") {
            break field
                .bytes()
                .await
                .map_err(|err| if too_large(&err) { ApiError::PayloadTooLarge } else { bad(err.body_text()) })?;
        }
    };
    if bytes.len() as u64 > state.config.image_max_bytes {
        return Err(ApiError::PayloadTooLarge);
    }
    let content_type = infer::get(&bytes)
        .map(|kind| kind.mime_type())
        .filter(|mime| IMAGE_TYPES.contains(mime))
        .ok_or_else(|| ApiError::UnsupportedMediaType("the image must be a PNG, JPEG or WebP file".into()))?;
    let bytes = state.heavy_work.run(move || check_image(&bytes, content_type)).await??;

    // A new key per upload: caches of the old image never serve the new one by mistake.
    let key = format!("events/{id}/{}", Uuid::new_v4().simple());
    state.images.put(&object_store::path::Path::from(key.as_str()), bytes.into()).await.map_err(|err| {
        tracing::error!(error = %err, event_id = %id, "storing an event image failed");
        ApiError::Unavailable
    })?;
    let url = format!("/api/v1/events/{id}/image");
    let previous: Option<Option<String>> = sqlx::query_scalar!(
        "WITH old AS (SELECT image_key FROM events WHERE id = $1 FOR NO KEY UPDATE)
         UPDATE events e SET image_key = $2, image_content_type = $3, image_url = $4, updated_at = now()
         FROM old WHERE e.id = $1 AND e.deleted_at IS NULL
         RETURNING old.image_key",
        id,
        &key,
        content_type,
        &url
    )
    .fetch_optional(&state.db)
    .await?;
    let previous = previous.ok_or(ApiError::NotFound("event"))?;
    if let Some(old) = previous.filter(|old| *old != key) {
        // Best effort: an orphaned object costs storage, never correctness.
        if let Err(err) = state.images.delete(&object_store::path::Path::from(old.as_str())).await {
            tracing::warn!(error = %err, event_id = %id, "could not delete the previous image");
        }
    }
    tracing::info!(event_id = %id, admin_id = %admin.id, content_type, "event image uploaded");
    load_event(&state.db, id, false).await.map(Json)
}

/// The event's uploaded image, with its content type; cacheable (the URL's content changes
/// only with a new upload, and its `ETag` says which).
#[utoipa::path(get, path = "/events/{id}/image", tag = "events",
    params(("id" = Uuid, Path, description = "Event id")),
    responses(
        (status = 200, description = "The image (PNG, JPEG or WebP)", content_type = "image/*", body = Vec<u8>),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 404, description = "No such event, or it has no uploaded image", body = ErrorBody),
        (status = 503, description = "The image store is unavailable", body = ErrorBody),
    ))]
pub async fn get_image(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::{HeaderValue, header};
    use axum::response::IntoResponse;
    let (key, content_type) = sqlx::query!(
        r#"SELECT image_key AS "image_key!", image_content_type AS "image_content_type!" FROM events
           WHERE id = $1 AND deleted_at IS NULL AND image_key IS NOT NULL AND image_content_type IS NOT NULL"#,
        id
    )
    .fetch_optional(&state.db)
    .await?
    .map(|row| (row.image_key, row.image_content_type))
    .ok_or(ApiError::NotFound("image"))?;
    let etag = format!("\"{}\"", key.rsplit('/').next().unwrap_or_default());
    let cache = HeaderValue::from_static("public, max-age=300");
    let etag_value = HeaderValue::from_str(&etag).map_err(anyhow::Error::from)?;
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok(
            (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value), (header::CACHE_CONTROL, cache)]).into_response()
        );
    }
    let bytes = state
        .images
        .get(&object_store::path::Path::from(key.as_str()))
        .await
        .map_err(|err| match err {
            object_store::Error::NotFound { .. } => ApiError::NotFound("image"),
            err => {
                tracing::error!(error = %err, event_id = %id, "reading an event image failed");
                ApiError::Unavailable
            }
        })?
        .bytes()
        .await
        .map_err(|err| {
            tracing::error!(error = %err, event_id = %id, "reading an event image failed");
            ApiError::Unavailable
        })?;
    let content_type = HeaderValue::from_str(&content_type).map_err(anyhow::Error::from)?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::ETAG, etag_value), (header::CACHE_CONTROL, cache)], bytes)
        .into_response())
}
