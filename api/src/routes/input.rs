//! Rules for fields of a request body that several resources share: texts, prices and the
//! merge of a `PATCH` onto what it edits.

use std::collections::BTreeMap;

use common::domain::currency::Currency;
use common::domain::money::{self, AmountText};
use common::domain::text;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// Largest price accepted: what `NUMERIC(12, 2)` holds.
pub(crate) const MAX_PRICE: Decimal = Decimal::from_parts(3_567_587_327, 232, 0, false, 2); // 9,999,999,999.99
pub(crate) const MAX_CAPACITY: i64 = 10_000_000;
pub(crate) const MAX_PER_ORDER: i64 = 1_000;

/// A field that was given, `null` included (`Some(None)`), apart from one left out (`None`,
/// through `#[serde(default)]`).
pub(crate) fn given<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    value: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(value).map(Some)
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid("validation_failed", message)
}

pub(crate) fn required_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if text::has_control_characters(value, false) {
        return Err(invalid(format!("{field} {}", text::CONTROL_CHARACTERS)));
    }
    if value.chars().count() > max {
        return Err(invalid(format!("{field} must be at most {max} characters")));
    }
    Ok(value.to_owned())
}

pub(crate) fn optional_text(field: &str, value: Option<&str>, max: usize) -> Result<Option<String>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        Some(value) => required_text(field, value, max).map(Some),
        None => Ok(None),
    }
}

/// A price as sent (a string or a number, taken exactly as written): 0 or more, at most
/// [`MAX_PRICE`], with no more decimal places than `currency` has.
pub(crate) fn valid_price(text: &AmountText, currency: &Currency) -> Result<Decimal, ApiError> {
    let price = money::parse_exact(&text.0).map_err(|err| invalid(format!("price {err}")))?;
    if price.is_sign_negative() && !price.is_zero() {
        return Err(invalid("price must not be negative"));
    }
    if price > MAX_PRICE {
        return Err(invalid(format!("price must be at most {MAX_PRICE}")));
    }
    currency.check(price).map_err(|err| invalid(format!("price {err} ({currency})")))?;
    // `-0` is zero.
    Ok(price.max(Decimal::ZERO))
}

/// `patch` (fields of a creation request, as sent) applied to `current` (the resource as a
/// creation request), read back as a request: the edit then passes the creation rules.
/// Merged as JSON text, not `serde_json::Value`s: a price sent as a number keeps its exact
/// digits (a `Value` would hold it as a float). Unknown fields and wrong types are 422
/// `invalid_body`.
pub(crate) fn merge_patch<T: Serialize + serde::de::DeserializeOwned>(
    current: &T,
    patch: &BTreeMap<String, Box<RawValue>>,
) -> Result<T, ApiError> {
    let current_text = serde_json::to_string(current).map_err(anyhow::Error::from)?;
    let mut merged: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(&current_text).map_err(anyhow::Error::from)?;
    merged.extend(patch.iter().map(|(key, value)| (key.clone(), value.clone())));
    let merged = serde_json::to_string(&merged).map_err(anyhow::Error::from)?;
    serde_json::from_str(&merged).map_err(|err| ApiError::invalid("invalid_body", err.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_price_is_what_the_column_holds() {
        assert_eq!(super::MAX_PRICE.to_string(), "9999999999.99");
    }
}
