//! What an account is made of, besides its e-mail address: a display name and a password.

use std::fmt;

use super::{Refusal, text};

/// Passwords shorter than this are refused (OWASP's minimum with no other composition rule).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longer passwords are refused so that hashing cost stays bounded.
pub const MAX_PASSWORD_CHARS: usize = 128;
/// Most characters of a display name.
pub const MAX_NAME_CHARS: usize = 200;

/// A display name: trimmed, 1 to 200 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub fn parse(input: &str) -> Result<Self, Refusal> {
        let name = input.trim();
        let refuse = |message: String| Refusal { code: "invalid_name", message };
        if text::has_control_characters(name, false) {
            return Err(refuse(format!("name {}", text::CONTROL_CHARACTERS)));
        }
        match name.chars().count() {
            0 => Err(refuse("name must not be empty".into())),
            1..=MAX_NAME_CHARS => Ok(Self(name.to_owned())),
            _ => Err(refuse(format!("name must be at most {MAX_NAME_CHARS} characters"))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new password of an acceptable length. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn parse(input: String) -> Result<Self, Refusal> {
        let chars = input.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            return Err(Refusal {
                code: "password_too_short",
                message: format!("password must be at least {MIN_PASSWORD_CHARS} characters"),
            });
        }
        if chars > MAX_PASSWORD_CHARS {
            return Err(Refusal {
                code: "password_too_long",
                message: format!("password must be at most {MAX_PASSWORD_CHARS} characters"),
            });
        }
        Ok(Self(input))
    }

    /// The password itself, to hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(UserName::parse("  Ada ").unwrap().as_str(), "Ada");
        assert_eq!(UserName::parse("   ").unwrap_err().code, "invalid_name");
        assert!(UserName::parse(&"x".repeat(201)).is_err());
        assert!(UserName::parse(&"é".repeat(200)).is_ok());
        assert!(UserName::parse("Ada\0").is_err());
        assert!(UserName::parse("Ada\nLovelace").is_err());
    }

    #[test]
    fn passwords_are_counted_in_characters_and_never_shown() {
        assert_eq!(Password::parse("1234567".into()).unwrap_err().code, "password_too_short");
        assert!(Password::parse("12345678".into()).is_ok());
        assert!(Password::parse("ü".repeat(128)).is_ok());
        assert_eq!(Password::parse("ü".repeat(129)).unwrap_err().code, "password_too_long");
        assert_eq!(format!("{:?}", Password::parse("hunter2hunter2".into()).unwrap()), "Password(…)");
    }
}
