//! One line of an order: so many tickets of one type, at the type's price of the moment the
//! order was placed (less the order's promo code, on the lines it applies to). Stored with
//! the order (`orders.lines`, JSON) and shown in its JSON.

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
    /// Price of one ticket of this type when the order was placed, after the order's promo
    /// code where it applies.
    #[schema(value_type = String, example = "49.90")]
    #[serde(serialize_with = "super::money::serialize", deserialize_with = "decimal_text")]
    pub unit_price: Decimal,
    /// On the lines the order's promo code applies to (and only there): the type's price
    /// before the code. These lines' tickets are the code's uses.
    #[schema(value_type = Option<String>, example = "59.90")]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::money::serialize_option",
        deserialize_with = "optional_decimal_text"
    )]
    pub list_price: Option<Decimal>,
}

impl OrderLine {
    pub fn amount(&self) -> Decimal {
        self.unit_price * Decimal::from(self.quantity)
    }

    /// Whether the order's promo code applies to this line.
    pub fn under_promo_code(&self) -> bool {
        self.list_price.is_some()
    }

    /// What the promo code took off this line (zero where it does not apply).
    pub fn discount(&self) -> Decimal {
        self.list_price.map_or(Decimal::ZERO, |list| (list - self.unit_price) * Decimal::from(self.quantity))
    }
}

/// Reads the amount the way [`super::money::serialize`] writes it (and the migration's
/// `numeric::text`): a decimal string.
fn decimal_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn optional_decimal_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Decimal>, D::Error> {
    Option::<String>::deserialize(deserializer)?.map(|text| text.parse().map_err(serde::de::Error::custom)).transpose()
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
            list_price: None,
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
        assert!(!migrated.under_promo_code());
        let discounted = OrderLine { list_price: Some(Decimal::new(25000, 2)), ..line };
        let text = serde_json::to_string(&discounted).unwrap();
        assert!(text.contains(r#""list_price":"250.00""#), "{text}");
        let read: OrderLine = serde_json::from_str(&text).unwrap();
        assert_eq!(read, discounted);
        assert_eq!(read.discount(), Decimal::new(10200, 2), "(250.00 - 199.00) × 2");
    }
}
