//! Keyset pagination shared by the list routes: `?limit=&cursor=`, newest first by id (UUID
//! v7, so id order is creation order), and `Link: <…>; rel="next"` + `X-Next-Cursor` when
//! another page follows.

use axum::http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::ApiError;

const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Opaque cursor from the previous page's `Link: rel="next"` header (`X-Next-Cursor`).
    pub cursor: Option<Uuid>,
}

impl PageQuery {
    /// The page size, checked.
    pub fn limit(&self) -> Result<i64, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid_query(format!("limit must be between 1 and {MAX_LIMIT}")));
        }
        Ok(limit)
    }

    /// Trims `rows` (fetched with `LIMIT limit + 1`) to the page and returns the headers
    /// pointing at the next page, if any. `path` may carry a query string of its own
    /// (filters), which the next page keeps.
    pub fn finish<T>(&self, path: &str, rows: &mut Vec<T>, id_of: impl Fn(&T) -> Uuid) -> HeaderMap {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        let mut headers = HeaderMap::new();
        if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            if let Some(last) = rows.last().map(&id_of) {
                let separator = if path.contains('?') { '&' } else { '?' };
                let link = format!("<{path}{separator}limit={limit}&cursor={last}>; rel=\"next\"");
                // Both values are ASCII built from a path literal and a UUID.
                if let (Ok(link), Ok(cursor)) = (HeaderValue::from_str(&link), HeaderValue::from_str(&last.to_string()))
                {
                    headers.insert(header::LINK, link);
                    headers.insert("x-next-cursor", cursor);
                }
            }
        }
        headers
    }
}
