//! Check-in codes: a ticket's id plus an HMAC of it under `TICKET_SECRET`, so a forged or
//! altered code is refused before any database lookup. The code is what the QR image holds:
//! `<ticket id, 32 hex digits>.<base64url of the first 16 bytes of HMAC-SHA256>`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use uuid::Uuid;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC kept in a code: 128 bits, far beyond guessing, and a short QR code.
const TAG_BYTES: usize = 16;

pub struct TicketCodes {
    key: Vec<u8>,
}

impl TicketCodes {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    fn mac(&self, ticket: Uuid) -> HmacSha256 {
        // HMAC accepts keys of any length; the error case cannot happen.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"turnstile-ticket-v1:");
        mac.update(ticket.as_bytes());
        mac
    }

    pub fn code(&self, ticket: Uuid) -> String {
        let tag = self.mac(ticket).finalize().into_bytes();
        format!("{}.{}", ticket.simple(), URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES]))
    }

    /// The ticket a code names, if its MAC is right (compared in constant time).
    pub fn verify(&self, code: &str) -> Option<Uuid> {
        let (id, tag) = code.trim().split_once('.')?;
        let ticket = Uuid::try_parse(id).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != TAG_BYTES {
            return None;
        }
        self.mac(ticket).verify_truncated_left(&tag).ok().map(|()| ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_verify_and_forgeries_do_not() {
        let codes = TicketCodes::new(b"ticket-secret-0123456789abcdef0123");
        let ticket = Uuid::now_v7();
        let code = codes.code(ticket);
        assert_eq!(codes.verify(&code), Some(ticket));
        let other = Uuid::now_v7();
        let (_, tag) = code.split_once('.').unwrap();
        assert_eq!(codes.verify(&format!("{}.{tag}", other.simple())), None, "another id with this MAC");
        let mut altered = code.clone();
        altered.pop();
        altered.push(if code.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(codes.verify(&altered), None);
        assert_eq!(TicketCodes::new(b"another-secret-another-secret-xxxx").verify(&code), None);
        for junk in ["", ".", "abc", "not-a-uuid.AAAA", &format!("{}.", ticket.simple())] {
            assert_eq!(codes.verify(junk), None, "{junk:?}");
        }
    }
}
