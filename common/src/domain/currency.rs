//! Currencies: ISO 4217 codes, checked against the standard's list (the `iso_currency`
//! crate), and how many decimal places an amount in each may have.

use std::fmt;

use rust_decimal::Decimal;

use super::money;

/// The currency of events created without one.
pub const DEFAULT: Currency = Currency(iso_currency::Currency::EUR);

/// An ISO 4217 currency that money can be counted in (it has minor units: not gold `XAU`,
/// not the testing code `XTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Currency(iso_currency::Currency);

/// Why a currency or a price in it was refused; the caller names the field.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CurrencyError {
    #[error("must be an ISO 4217 currency code in capitals, such as \"EUR\" or \"USD\"")]
    Unknown,
    #[error("has no minor unit: it is not a currency prices can be given in")]
    NotMoney,
    #[error("may have at most {0} decimal places in this currency")]
    TooPrecise(u32),
}

impl Currency {
    /// The currency with this code (exactly three capital letters).
    pub fn parse(code: &str) -> Result<Self, CurrencyError> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(CurrencyError::Unknown);
        }
        let currency = iso_currency::Currency::from_code(code).ok_or(CurrencyError::Unknown)?;
        if currency.exponent().is_none() {
            return Err(CurrencyError::NotMoney);
        }
        Ok(Self(currency))
    }

    pub fn code(self) -> &'static str {
        self.0.code()
    }

    /// Decimal places an amount may have: the currency's minor unit, at most the two that
    /// every amount is stored with (a yen price is whole, a dinar price has two places).
    pub fn places(self) -> u32 {
        self.0.exponent().map_or(0, u32::from).min(money::SCALE)
    }

    /// Checks that `amount` is expressible in this currency.
    pub fn check(self, amount: Decimal) -> Result<(), CurrencyError> {
        if amount.normalize().scale() > self.places() {
            return Err(CurrencyError::TooPrecise(self.places()));
        }
        Ok(())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_iso_codes_of_money_only() {
        assert_eq!(Currency::parse("USD").unwrap().code(), "USD");
        assert_eq!(Currency::parse("JPY").unwrap().places(), 0);
        assert_eq!(Currency::parse("KWD").unwrap().places(), 2);
        assert_eq!(Currency::parse("eur"), Err(CurrencyError::Unknown));
        assert_eq!(Currency::parse("EURO"), Err(CurrencyError::Unknown));
        assert_eq!(Currency::parse("ABC"), Err(CurrencyError::Unknown));
        assert_eq!(Currency::parse("XAU"), Err(CurrencyError::NotMoney));
        assert_eq!(DEFAULT.code(), "EUR");
    }

    #[test]
    fn amounts_fit_the_minor_unit() {
        let jpy = Currency::parse("JPY").unwrap();
        assert!(jpy.check(Decimal::new(1500, 0)).is_ok());
        assert!(jpy.check(Decimal::new(150000, 2)).is_ok(), "1500.00 is whole");
        assert_eq!(jpy.check(Decimal::new(150050, 2)), Err(CurrencyError::TooPrecise(0)));
        assert!(DEFAULT.check(Decimal::new(4990, 2)).is_ok());
    }
}
