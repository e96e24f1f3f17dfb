//! The `Idempotency-Key` a client sends with a purchase.

use super::Refusal;

/// Most bytes of a key.
pub const MAX_KEY_LEN: usize = 255;

/// 1 to 255 visible ASCII characters, scoped to the user who sent it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(input: &[u8]) -> Result<Self, Refusal> {
        if input.is_empty() || input.len() > MAX_KEY_LEN || !input.iter().all(u8::is_ascii_graphic) {
            return Err(Refusal {
                code: "invalid_idempotency_key",
                message: format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
            });
        }
        Ok(Self(input.iter().map(|&b| char::from(b)).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::IdempotencyKey;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(IdempotencyKey::parse(b"order-42").unwrap().as_str(), "order-42");
        assert_eq!(IdempotencyKey::parse(b"").unwrap_err().code, "invalid_idempotency_key");
        assert!(IdempotencyKey::parse(b"has space").is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 255]).is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_err());
        assert!(IdempotencyKey::parse(b"caf\xc3\xa9").is_err());
    }
}
