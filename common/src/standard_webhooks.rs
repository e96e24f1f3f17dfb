//! Signing and verifying webhooks per the Standard Webhooks specification: the signature is
//! `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`, the timestamp is
//! Unix seconds and must be within [`TOLERANCE_SECS`] of now, and the signature header may
//! carry several space-separated signatures (one per key while a key is being rotated).
//!
//! Written on the RustCrypto `hmac` and `sha2` crates, with the official `standardwebhooks`
//! crate (1.0.1) as the tests' reference rather than the code's: its `Webhook::verify`
//! reads the system clock itself, so a webhook cannot be judged at a given time (the
//! tolerance's edges are tested here at fixed times), it returns nothing of the message (the
//! payment webhook de-duplicates by `webhook-id`), and it signs only UTF-8 bodies. Its
//! comparison is sound (lengths first, then every byte); here it is `Mac::verify_slice`,
//! constant-time and length-checked as well. The tests sign and verify both ways against it.

use base64::Engine as _;
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Header names, lower-case as HTTP/2 sends them.
pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// How far a webhook's timestamp may be from the receiver's clock, either way.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// The longest `webhook-id` accepted.
pub const MAX_ID_LEN: usize = 255;

/// An HMAC key (the decoded bytes of a `whsec_…` secret). Its `Debug` output is redacted.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length; the error case cannot happen.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for this message: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
    }

    /// Checks a received webhook against this key at time `now` (Unix seconds). On success,
    /// returns the message id and timestamp, which the receiver uses to de-duplicate.
    pub fn verify<'a>(&self, headers: Headers<'a>, body: &[u8], now: i64) -> Result<Verified<'a>, VerifyError> {
        let id = headers.id.ok_or(VerifyError::Missing(HEADER_ID))?;
        let timestamp = headers.timestamp.ok_or(VerifyError::Missing(HEADER_TIMESTAMP))?;
        let signatures = headers.signature.ok_or(VerifyError::Missing(HEADER_SIGNATURE))?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(VerifyError::BadId);
        }
        let timestamp: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
        if (now - timestamp).abs() > TOLERANCE_SECS {
            return Err(VerifyError::OutsideTolerance);
        }
        let mac = self.mac(id, timestamp, body);
        let matches = signatures
            .split(' ')
            .filter_map(|signature| signature.strip_prefix("v1,"))
            .filter_map(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded).ok())
            .any(|tag| mac.clone().verify_slice(&tag).is_ok());
        if matches { Ok(Verified { id, timestamp }) } else { Err(VerifyError::NoValidSignature) }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// The three Standard Webhooks headers of a received request, as text when present.
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// A webhook whose signature checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified<'a> {
    pub id: &'a str,
    pub timestamp: i64,
}

/// Why a webhook was refused. The messages are safe to return to the sender.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyError {
    Missing(&'static str),
    BadId,
    BadTimestamp,
    OutsideTolerance,
    NoValidSignature,
}

impl VerifyError {
    /// The explanation for the sender, as static text (an HTTP error can carry it as is).
    pub fn message(&self) -> &'static str {
        match self {
            Self::Missing(HEADER_ID) => "missing webhook-id header",
            Self::Missing(HEADER_TIMESTAMP) => "missing webhook-timestamp header",
            Self::Missing(_) => "missing webhook-signature header",
            Self::BadId => "webhook-id must be 1 to 255 characters",
            Self::BadTimestamp => "webhook-timestamp must be Unix seconds",
            Self::OutsideTolerance => "webhook-timestamp is more than 5 minutes away from the server's clock",
            Self::NoValidSignature => "no valid signature in webhook-signature",
        }
    }
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for VerifyError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    const SECRET: &str = "C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const EXPECTED: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn key() -> SigningKey {
        SigningKey::new(base64::engine::general_purpose::STANDARD.decode(SECRET).unwrap())
    }

    fn headers(signature: &str) -> Headers<'_> {
        Headers { id: Some(ID), timestamp: Some("1649367553"), signature: Some(signature) }
    }

    #[test]
    fn matches_the_reference_signature() {
        assert_eq!(key().sign(ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn verifies_within_tolerance_only() {
        let key = key();
        assert_eq!(key.verify(headers(EXPECTED), BODY, TS), Ok(Verified { id: ID, timestamp: TS }));
        assert!(key.verify(headers(EXPECTED), BODY, TS + TOLERANCE_SECS).is_ok());
        assert_eq!(key.verify(headers(EXPECTED), BODY, TS + TOLERANCE_SECS + 1), Err(VerifyError::OutsideTolerance));
        assert_eq!(key.verify(headers(EXPECTED), BODY, TS - TOLERANCE_SECS - 1), Err(VerifyError::OutsideTolerance));
    }

    #[test]
    fn refuses_tampering_and_truncation() {
        let key = key();
        let refused = |signature: &str, body: &[u8]| key.verify(headers(signature), body, TS).map(|_| ());
        assert_eq!(refused(EXPECTED, b"{}"), Err(VerifyError::NoValidSignature));
        // Empty, truncated and unversioned signatures: the flaw of a zip-based comparison.
        for bad in ["v1,", "v1,tZ1I4", "v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=", "", "v1,not base64"] {
            assert_eq!(refused(bad, BODY), Err(VerifyError::NoValidSignature), "{bad:?}");
        }
        let other = SigningKey::new(vec![9; 32]);
        assert_eq!(other.verify(headers(EXPECTED), BODY, TS), Err(VerifyError::NoValidSignature));
        let mut changed_id = headers(EXPECTED);
        changed_id.id = Some("msg_other");
        assert_eq!(key.verify(changed_id, BODY, TS), Err(VerifyError::NoValidSignature));
    }

    #[test]
    fn accepts_any_of_several_signatures() {
        let old = SigningKey::new(vec![1; 32]).sign(ID, TS, BODY);
        let rotated = format!("{old} {EXPECTED} v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q=");
        assert!(key().verify(headers(&rotated), BODY, TS).is_ok());
        let without = format!("{old} v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q=");
        assert_eq!(key().verify(headers(&without), BODY, TS), Err(VerifyError::NoValidSignature));
    }

    /// The official crate signs as we do, accepts what we sign and we accept what it signs.
    #[test]
    fn agrees_with_the_official_crate() {
        let official = standardwebhooks::Webhook::new(SECRET).unwrap();
        assert_eq!(official.sign(ID, TS, BODY).unwrap(), key().sign(ID, TS, BODY));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let ours = key().sign(ID, now, BODY);
        let mut received = http::HeaderMap::new();
        received.insert(HEADER_ID, ID.parse().unwrap());
        received.insert(HEADER_TIMESTAMP, now.to_string().parse().unwrap());
        received.insert(HEADER_SIGNATURE, ours.parse().unwrap());
        assert!(official.verify(BODY, &received).is_ok());
        assert!(official.verify(b"{}", &received).is_err());
        let theirs = official.sign(ID, now, BODY).unwrap();
        let timestamp = now.to_string();
        let at_now = Headers { timestamp: Some(&timestamp), ..headers(&theirs) };
        assert_eq!(key().verify(at_now, BODY, now), Ok(Verified { id: ID, timestamp: now }));
        assert_eq!(key().verify(at_now, b"{}", now), Err(VerifyError::NoValidSignature));
    }

    #[test]
    fn names_what_is_missing() {
        let key = key();
        let full = headers(EXPECTED);
        assert_eq!(key.verify(Headers { id: None, ..full }, BODY, TS), Err(VerifyError::Missing(HEADER_ID)));
        assert_eq!(
            key.verify(Headers { timestamp: None, ..full }, BODY, TS),
            Err(VerifyError::Missing(HEADER_TIMESTAMP))
        );
        assert_eq!(
            key.verify(Headers { signature: None, ..full }, BODY, TS),
            Err(VerifyError::Missing(HEADER_SIGNATURE))
        );
        assert_eq!(key.verify(Headers { timestamp: Some("soon"), ..full }, BODY, TS), Err(VerifyError::BadTimestamp));
        assert_eq!(key.verify(Headers { id: Some(""), ..full }, BODY, TS), Err(VerifyError::BadId));
    }
}
