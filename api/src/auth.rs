//! Authentication: argon2id password hashes, HS256 access tokens, and the extractors that
//! turn a `Authorization: Bearer …` header into a caller.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use common::domain::Role;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// OWASP's recommended argon2id parameters: 19 MiB of memory, 2 passes, 1 lane.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password on the blocking pool: argon2 takes tens of milliseconds of CPU by
/// design, which must not stall the async workers.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        hasher()
            .hash_password(password.as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|err| anyhow::anyhow!("hashing password: {err}"))
    })
    .await?
}

/// Verifies a password against a stored hash. With no stored hash (unknown account) it
/// still does the same work against a dummy hash, so response time does not reveal
/// whether an account exists.
pub async fn verify_password(password: String, stored: Option<String>) -> anyhow::Result<bool> {
    tokio::task::spawn_blocking(move || {
        let (hash, known) = match stored {
            Some(hash) => (hash, true),
            None => (dummy_hash().to_owned(), false),
        };
        let matches = hasher().verify_password(password.as_bytes(), hash.as_str()).is_ok();
        Ok(known && matches)
    })
    .await?
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random = Uuid::new_v4().to_string();
        hasher().hash_password(random.as_bytes()).map(|h| h.to_string()).unwrap_or_default()
    })
}

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub role: Role,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

/// Issues and checks access tokens. The algorithm is pinned to HS256: a token whose header
/// names any other algorithm (including `none`) is refused.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], issuer: &str, ttl: Duration) -> Self {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_owned(),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(&self, user: Uuid, role: Role) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = Claims { sub: user, role, iss: self.issuer.clone(), iat: now, exp: now + self.ttl.as_secs() };
        Ok(jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &self.encoding)?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|data| data.claims).map_err(|err| {
            match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::Unauthorized("access token expired"),
                _ => ApiError::Unauthorized("invalid access token"),
            }
        })
    }
}

/// Any authenticated caller.
#[derive(Clone, Copy, Debug)]
pub struct AuthUser {
    pub id: Uuid,
    pub role: Role,
}

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(ApiError::Unauthorized("expected `Authorization: Bearer <token>`"))?;
        let claims = state.tokens.verify(token)?;
        Ok(AuthUser { id: claims.sub, role: claims.role })
    }
}

/// `Option<AuthUser>`: `None` without an `Authorization` header (an anonymous caller of a
/// public route), 401 with a header that does not hold a valid token.
impl axum::extract::OptionalFromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Option<Self>, Self::Rejection> {
        if !parts.headers.contains_key(AUTHORIZATION) {
            return Ok(None);
        }
        <AuthUser as FromRequestParts<AppState>>::from_request_parts(parts, state).await.map(Some)
    }
}

/// A caller with the admin role; anyone else gets 403 (or 401 without a valid token).
#[derive(Clone, Copy, Debug)]
pub struct AdminUser(pub AuthUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.is_admin() { Ok(AdminUser(user)) } else { Err(ApiError::Forbidden) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn issued_tokens_verify() {
        let tokens = Tokens::new(SECRET, "turnstile", Duration::from_secs(60));
        let id = Uuid::now_v7();
        let claims = tokens.verify(&tokens.issue(id, Role::Admin).unwrap()).unwrap();
        assert_eq!((claims.sub, claims.role), (id, Role::Admin));
    }

    #[test]
    fn other_issuer_or_secret_is_refused() {
        let tokens = Tokens::new(SECRET, "turnstile", Duration::from_secs(60));
        let other_issuer = Tokens::new(SECRET, "someone-else", Duration::from_secs(60));
        let other_secret = Tokens::new(b"another-secret-another-secret-xx", "turnstile", Duration::from_secs(60));
        let id = Uuid::now_v7();
        assert!(tokens.verify(&other_issuer.issue(id, Role::User).unwrap()).is_err());
        assert!(tokens.verify(&other_secret.issue(id, Role::User).unwrap()).is_err());
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(verify_password("correct horse".into(), Some(hash.clone())).await.unwrap());
        assert!(!verify_password("wrong horse".into(), Some(hash)).await.unwrap());
        assert!(!verify_password("anything".into(), None).await.unwrap());
    }
}
