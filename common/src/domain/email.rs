//! A normalised e-mail address.

use std::fmt;

/// An e-mail address, trimmed and lower-cased, so that uniqueness is case-insensitive.
///
/// The check is deliberately modest (one `@`, a dotted domain, no spaces, RFC 5321 length
/// limits): the only real proof that an address works is mail reaching it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(input: &str) -> Result<Self, &'static str> {
        let email = input.trim().to_lowercase();
        if email.is_empty() {
            return Err("email must not be empty");
        }
        if email.len() > 254 {
            return Err("email must be at most 254 characters");
        }
        let (local, domain) = email.split_once('@').ok_or("email must contain '@'")?;
        let valid_local = !local.is_empty() && local.len() <= 64;
        let valid_domain = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && !domain.contains('@');
        if !valid_local || !valid_domain || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("email is not a valid address");
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Email;

    #[test]
    fn normalises_case_and_whitespace() {
        assert_eq!(Email::parse("  Ada@Example.COM ").unwrap().as_str(), "ada@example.com");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "   ",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@.example.com",
            "ada@example.com.",
            "ada@exa..mple.com",
        ] {
            assert!(Email::parse(bad).is_err(), "accepted {bad:?}");
        }
        let long = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long).is_err());
    }
}
