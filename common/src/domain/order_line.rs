//! One line of an order: so many tickets of one type, at the type's price of the moment the
//! order was placed. Stored with the order (`orders.lines`, JSON) and shown in its JSON.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderLine {
    pub ticket_type_id: Uuid,
    /// The type's name when the order was placed.
    #[schema(example = "General admission")]
    pub name: String,
    #[schema(example = 2)]
    pub quantity: i32,
    /// Price of one ticket of this type when the order was placed.
    #[schema(value_type = String, example = "49.90")]
    #[serde(serialize_with = "super::money::serialize", deserialize_with = "decimal_text")]
    pub unit_price: Decimal,
}

impl OrderLine {
    pub fn amount(&self) -> Decimal {
        self.unit_price * Decimal::from(self.quantity)
    }
}

/// Reads the amount the way [`super::money::serialize`] writes it (and the migration's
/// `numeric::text`): a decimal string.
fn decimal_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_stored() {
        let line = OrderLine {
            ticket_type_id: Uuid::from_u128(1),
            name: "VIP".into(),
            quantity: 2,
            unit_price: Decimal::new(1990, 1),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.contains(r#""unit_price":"199.00""#), "{text}");
        assert_eq!(serde_json::from_str::<OrderLine>(&text).unwrap(), line);
        // As the migration writes existing orders' lines.
        let migrated: OrderLine = serde_json::from_str(
            r#"{"ticket_type_id": "00000000-0000-0000-0000-000000000001", "name": "General admission",
                "quantity": 3, "unit_price": "49.9"}"#,
        )
        .unwrap();
        assert_eq!(migrated.amount(), Decimal::new(14970, 2));
    }
}
