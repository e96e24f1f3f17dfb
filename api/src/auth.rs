//! Authentication: argon2id password hashes, HS256 access tokens, and the extractors that
//! turn a `Authorization: Bearer …` header into a caller.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use common::domain::{Password, Role};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ApiError, Required};
use crate::state::AppState;

/// OWASP's recommended argon2id parameters: 19 MiB of memory, 2 passes, 1 lane.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("static argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The CPU- and memory-heavy work of requests (argon2id takes 19 MiB and tens of
/// milliseconds per hash by design; decoding an image more), run a few at a time on threads
/// of its own. Unbounded, a burst of log-ins with made-up emails would start one 19 MiB
/// hash per request on up to 512 blocking threads and exhaust memory; bounded, a request
/// waits up to [`HeavyWork::WAIT`] for its turn and is then refused with 503 `busy`.
///
/// The threads are fixed, not Tokio's blocking pool: memory the allocator keeps after a job
/// (a thread's arena) is then kept once per thread of this pool and reused by its next job,
/// instead of once per short-lived blocking thread.
pub struct HeavyWork {
    permits: Arc<tokio::sync::Semaphore>,
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl HeavyWork {
    /// How long a request waits for a free slot before it is refused.
    pub const WAIT: Duration = Duration::from_secs(2);

    /// `slots` jobs at once (at least one), on as many threads.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for i in 0..slots {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("heavy-work-{i}")).spawn(move || {
                loop {
                    // The lock is held only while waiting: the job runs without it.
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { return };
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a password hash or image decoding panicked");
                    }
                }
            });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a heavy-work thread");
            }
        }
        Self { permits: Arc::new(tokio::sync::Semaphore::new(slots)), jobs }
    }

    /// One slot per core: more would only make each job slower.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |cores| cores.get()))
    }

    /// Runs `job` once a slot is free; 503 `busy` after waiting [`Self::WAIT`]. The slot is
    /// held by the job itself, so a request that gives up (its client went away, its time
    /// ran out) cannot start more jobs than there are slots.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(Self::WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::Busy)?
            .map_err(|_| ApiError::Busy)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(job());
            drop(permit);
        });
        self.jobs.send(job).map_err(|_| ApiError::Internal(anyhow::anyhow!("the heavy-work threads are gone")))?;
        result.await.map_err(|_| ApiError::Internal(anyhow::anyhow!("a heavy-work job panicked")))
    }
}

/// Hashes a password (see [`HeavyWork`]).
pub async fn hash_password(work: &HeavyWork, password: Password) -> Result<String, ApiError> {
    work.run(move || {
        hasher()
            .hash_password(password.expose().as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|err| ApiError::Internal(anyhow::anyhow!("hashing password: {err}")))
    })
    .await?
}

/// Verifies a password against a stored hash. With no stored hash (unknown account) it
/// still does the same work against a dummy hash, so response time does not reveal
/// whether an account exists.
pub async fn verify_password(work: &HeavyWork, password: String, stored: Option<String>) -> Result<bool, ApiError> {
    work.run(move || {
        let (hash, known) = match stored {
            Some(hash) => (hash, true),
            None => (dummy_hash().to_owned(), false),
        };
        let matches = hasher().verify_password(password.as_bytes(), hash.as_str()).is_ok();
        known && matches
    })
    .await
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
    /// The account's `token_version` when the token was issued: a later change of role or
    /// password raises it and so revokes the token (see `revocations`). Absent means 0.
    #[serde(default)]
    pub ver: i32,
}

/// Clock difference tolerated between issuing and checking a token, in seconds.
const LEEWAY_SECS: u64 = 5;

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
        // A token not valid yet (`nbf` ahead) is refused, not taken.
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
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

    pub fn issue(&self, user: Uuid, role: Role, version: i32) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims =
            Claims { sub: user, role, iss: self.issuer.clone(), iat: now, exp: now + self.ttl.as_secs(), ver: version };
        Ok(jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &self.encoding)?)
    }

    /// The token's claims, if it is one this api would have issued: signed with the key,
    /// HS256, this issuer, not expired and already valid (`nbf`), issued no later than now
    /// and for no longer than `JWT_TTL_SECS`, and without a `crit` header (extensions that
    /// must be understood, which none here are).
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        const INVALID: ApiError = ApiError::Unauthorized("invalid access token");
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|err| match err
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::Unauthorized("access token expired"),
            _ => INVALID,
        })?;
        if data.header.crit.is_some() {
            return Err(INVALID);
        }
        let claims = data.claims;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(anyhow::Error::from)?.as_secs();
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if claims.iat > now + LEEWAY_SECS || lifetime > self.ttl.as_secs() + LEEWAY_SECS {
            return Err(INVALID);
        }
        Ok(claims)
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

    /// Whether the caller may check tickets in: door staff and admins.
    pub fn may_check_in(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Staff)
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
        state.revocations.check(&state.db, claims.sub, claims.ver).await?;
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
        if user.is_admin() { Ok(AdminUser(user)) } else { Err(ApiError::Forbidden(Required::Admin)) }
    }
}

/// A caller who may check tickets in (the `staff` or `admin` role); anyone else gets 403.
#[derive(Clone, Copy, Debug)]
pub struct DoorStaff(pub AuthUser);

impl FromRequestParts<AppState> for DoorStaff {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.may_check_in() { Ok(DoorStaff(user)) } else { Err(ApiError::Forbidden(Required::DoorStaff)) }
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
        let claims = tokens.verify(&tokens.issue(id, Role::Admin, 3).unwrap()).unwrap();
        assert_eq!((claims.sub, claims.role, claims.ver), (id, Role::Admin, 3));
    }

    #[test]
    fn other_issuer_or_secret_is_refused() {
        let tokens = Tokens::new(SECRET, "turnstile", Duration::from_secs(60));
        let other_issuer = Tokens::new(SECRET, "someone-else", Duration::from_secs(60));
        let other_secret = Tokens::new(b"another-secret-another-secret-xx", "turnstile", Duration::from_secs(60));
        let id = Uuid::now_v7();
        assert!(tokens.verify(&other_issuer.issue(id, Role::User, 0).unwrap()).is_err());
        assert!(tokens.verify(&other_secret.issue(id, Role::User, 0).unwrap()).is_err());
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let work = HeavyWork::new(1);
        let hash = hash_password(&work, Password::parse("correct horse".into()).unwrap()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(verify_password(&work, "correct horse".into(), Some(hash.clone())).await.unwrap());
        assert!(!verify_password(&work, "wrong horse".into(), Some(hash)).await.unwrap());
        assert!(!verify_password(&work, "anything".into(), None).await.unwrap());
    }

    /// Finding 10 (issue 29): tokens this api would never issue are refused even when
    /// signed with its key: not valid yet, issued in the future, living longer than
    /// `JWT_TTL_SECS`, or naming critical extensions.
    #[test]
    fn tokens_the_api_would_not_issue_are_refused() {
        let tokens = Tokens::new(SECRET, "turnstile", Duration::from_secs(60));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let sign = |header: &Header, extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": Uuid::now_v7(), "role": "admin", "iss": "turnstile",
                "iat": now, "exp": now + 60});
            claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            jsonwebtoken::encode(header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
        };
        let hs256 = Header::new(jsonwebtoken::Algorithm::HS256);
        assert!(tokens.verify(&sign(&hs256, serde_json::json!({}))).is_ok());
        assert!(tokens.verify(&sign(&hs256, serde_json::json!({"nbf": now + 600}))).is_err());
        assert!(tokens.verify(&sign(&hs256, serde_json::json!({"iat": now + 600, "exp": now + 660}))).is_err());
        assert!(tokens.verify(&sign(&hs256, serde_json::json!({"exp": now + 86_400 * 365}))).is_err());
        let mut critical = hs256.clone();
        critical.crit = Some(vec!["exp".into()]);
        assert!(tokens.verify(&sign(&critical, serde_json::json!({}))).is_err());
    }

    #[test]
    fn tokens_without_a_version_have_version_zero() {
        let tokens = Tokens::new(SECRET, "turnstile", Duration::from_secs(60));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims =
            serde_json::json!({"sub": Uuid::now_v7(), "role": "user", "iss": "turnstile", "iat": now, "exp": now + 60});
        let token = jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(tokens.verify(&token).unwrap().ver, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heavy_work_runs_a_bounded_number_of_jobs_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let work = Arc::new(HeavyWork::new(2));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..8)
            .map(|_| {
                let (work, running, most) = (work.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    work.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
