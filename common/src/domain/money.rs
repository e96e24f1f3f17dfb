//! Money: `rust_decimal::Decimal` with two decimal places, never floats.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Decimal places of every amount (prices and totals).
pub const SCALE: u32 = 2;

/// Serialises an amount as a string with exactly two decimal places (`"0.00"`, `"49.90"`),
/// whatever scale the value carries (PostgreSQL returns zero without one).
pub fn serialize<S: Serializer>(amount: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
    let mut amount = *amount;
    amount.rescale(SCALE);
    serializer.collect_str(&amount)
}

/// [`serialize`] for an amount that may be absent (`null`).
pub fn serialize_option<S: Serializer>(amount: &Option<Decimal>, serializer: S) -> Result<S::Ok, S::Error> {
    match amount {
        Some(amount) => serialize(amount, serializer),
        None => serializer.serialize_none(),
    }
}

/// One ticket's price under a promo code: `percent_off` taken off, rounded half-up to
/// `places` (the currency's minor unit), or `amount_off` taken off; never below zero.
/// Neither (an access code) leaves the price as it is.
pub fn discounted(price: Decimal, percent_off: Option<Decimal>, amount_off: Option<Decimal>, places: u32) -> Decimal {
    let price = match (percent_off, amount_off) {
        (Some(percent), _) => (price * (Decimal::ONE_HUNDRED - percent) / Decimal::ONE_HUNDRED)
            .round_dp_with_strategy(places, rust_decimal::RoundingStrategy::MidpointAwayFromZero),
        (None, Some(amount)) => price - amount,
        (None, None) => price,
    };
    price.max(Decimal::ZERO)
}

/// The longest amount text looked at (digits, a sign, a point and trailing zeros).
const MAX_TEXT: usize = 40;

/// Why an amount was refused; the caller names the field.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("must be a decimal number written with digits and at most one point, such as \"49.90\"")]
    NotDecimal,
    #[error("must have at most {SCALE} decimal places")]
    TooPrecise,
}

/// Parses an amount exactly as written: an optional `-`, digits, and optionally a point
/// followed by digits; no exponent, no `_`, no `+`, no spaces. Nothing is rounded: more
/// than two decimal places (other than trailing zeros: `1.100` is `1.10`) is refused, and
/// so is anything `Decimal` could only hold approximately.
pub fn parse_exact(text: &str) -> Result<Decimal, AmountError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if text.len() > MAX_TEXT || !all_digits(whole) || !all_digits(fraction) {
        return Err(AmountError::NotDecimal);
    }
    if fraction.trim_end_matches('0').len() > SCALE as usize {
        return Err(AmountError::TooPrecise);
    }
    let amount = Decimal::from_str_exact(text).map_err(|_| AmountError::NotDecimal)?;
    Ok(amount.normalize())
}

/// An amount as the client sent it, a JSON string (`"49.90"`) or a JSON number (`49.90`),
/// kept as its exact text for [`parse_exact`]: a number is never read through a float, so
/// `19.999999999999999` is refused rather than taken for `20`. Deserialise it from JSON text
/// (`serde_json::from_slice`/`from_str`), not from a `serde_json::Value`, which has already
/// turned numbers into floats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmountText(pub String);

impl<'de> Deserialize<'de> for AmountText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str(text).map(AmountText).map_err(D::Error::custom),
            Some(b'-' | b'0'..=b'9') => Ok(AmountText(text.to_owned())),
            _ => Err(D::Error::custom(format!("expected a decimal string or number, found {text}"))),
        }
    }
}

impl Serialize for AmountText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl From<Decimal> for AmountText {
    fn from(amount: Decimal) -> Self {
        AmountText(amount.to_string())
    }
}

impl FromStr for AmountText {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(AmountText(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Price(#[serde(serialize_with = "super::serialize")] Decimal);

    #[test]
    fn always_two_places() {
        for (input, shown) in
            [("0", "\"0.00\""), ("49.9", "\"49.90\""), ("12.50", "\"12.50\""), ("1000", "\"1000.00\"")]
        {
            let json = serde_json::to_string(&Price(Decimal::from_str(input).unwrap())).unwrap();
            assert_eq!(json, shown);
        }
    }

    #[test]
    fn amounts_parse_exactly_or_not_at_all() {
        for (text, value) in [("49.90", "49.9"), ("0", "0"), ("1.100", "1.1"), ("-0.01", "-0.01"), ("007", "7")] {
            assert_eq!(parse_exact(text), Ok(Decimal::from_str(value).unwrap()), "{text}");
        }
        for text in ["1_000", "1e2", "1E2", "+1", " 1", "1 ", "", ".5", "5.", "1.2.3", "0x10", "NaN", "-", "1,5"] {
            assert_eq!(parse_exact(text), Err(AmountError::NotDecimal), "{text:?}");
        }
        for text in ["1.001", "1.00000000000000000000000000001", "19.999999999999999"] {
            assert_eq!(parse_exact(text), Err(AmountError::TooPrecise), "{text}");
        }
        assert_eq!(parse_exact(&"9".repeat(41)), Err(AmountError::NotDecimal));
        assert_eq!(parse_exact(&"9".repeat(30)), Err(AmountError::NotDecimal), "beyond what Decimal holds");
    }

    #[derive(serde::Deserialize)]
    struct Body {
        price: AmountText,
    }

    #[test]
    fn numbers_keep_their_exact_text() {
        let text = |json: &str| serde_json::from_str::<Body>(json).map(|body| body.price.0);
        assert_eq!(text(r#"{"price": 19.999999999999999}"#).unwrap(), "19.999999999999999");
        assert_eq!(text(r#"{"price": "49.90"}"#).unwrap(), "49.90");
        assert_eq!(text(r#"{"price": 1e2}"#).unwrap(), "1e2");
        assert!(text(r#"{"price": null}"#).is_err());
        assert!(text(r#"{"price": true}"#).is_err());
    }
}
