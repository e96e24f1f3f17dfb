//! Money: `rust_decimal::Decimal` with two decimal places, never floats.

use rust_decimal::Decimal;
use serde::Serializer;

/// Decimal places of every amount (prices and totals).
pub const SCALE: u32 = 2;

/// Serialises an amount as a string with exactly two decimal places (`"0.00"`, `"49.90"`),
/// whatever scale the value carries (PostgreSQL returns zero without one).
pub fn serialize<S: Serializer>(amount: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
    let mut amount = *amount;
    amount.rescale(SCALE);
    serializer.collect_str(&amount)
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use std::str::FromStr;

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
}
