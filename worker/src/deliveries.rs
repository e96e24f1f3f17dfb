//! Webhook deliveries: sends each due delivery to its endpoint, signed per Standard Webhooks
//! with the endpoint's secret, and records every attempt. A 2xx answer is success; a 410
//! disables the endpoint; anything else (other statuses, timeouts, refused connections) is
//! retried on `WEBHOOK_RETRY_SCHEDULE` with jitter, then given up (`FAILED`).
//!
//! Deliveries are rows, so a restart loses none. A worker takes a delivery by stamping a
//! lease on it (`FOR UPDATE SKIP LOCKED`, lease longer than the request timeout), so two
//! workers never send the same attempt at once; a worker that dies mid-attempt leaves a
//! lease that runs out, and the delivery is sent again (receivers de-duplicate by
//! `webhook-id`, which stays the same).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use common::config::WorkerConfig;
use common::domain::DeliveryStatus;
use common::standard_webhooks::{self, SigningKey};
use common::webhook_targets::TargetPolicy;
use futures_util::future::join_all;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::poll::{Next, Round, Steps};

/// Deliveries taken per round, sent concurrently.
const ROUND: i64 = 32;
/// Of them, at most this many to one target host (and port): endpoints of many users, or
/// many endpoints of one, that point at one third party cannot turn each order into a burst
/// at it; the rest wait for the next rounds.
const PER_HOST: i64 = 4;
/// Kept of an error message in the attempt log.
const MAX_ERROR_CHARS: usize = 500;

pub struct Deliverer {
    db: PgPool,
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
    schedule: Vec<Duration>,
    lease: Duration,
}

struct Due {
    id: Uuid,
    endpoint_id: Uuid,
    attempts: i32,
    payload: String,
    url: String,
    secret: String,
    enabled: bool,
    /// The trace of the order the delivery is about (see `common::telemetry`).
    traceparent: Option<String>,
}

/// What one attempt came to.
enum AttemptOutcome {
    Delivered(u16),
    Gone,
    Failed { status: Option<u16>, error: Option<String> },
}

impl Deliverer {
    pub fn new(db: PgPool, config: &WorkerConfig) -> anyhow::Result<Self> {
        let policy = Arc::new(TargetPolicy::new(config.webhook_targets.allow_networks.clone()));
        let timeout = Duration::from_secs(config.webhook_timeout_secs);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect could lead anywhere, including where the resolver would not go.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver(policy.clone())))
            // Never through a proxy from HTTP_PROXY/HTTPS_PROXY/ALL_PROXY: the resolver would
            // then judge only the proxy's address, and the proxy would go wherever the
            // endpoint's name points, private networks included.
            .no_proxy()
            .user_agent(concat!("Turnstile-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            db,
            client,
            policy,
            schedule: config.webhook_retry_schedule.clone(),
            lease: timeout + Duration::from_secs(30),
        })
    }

    /// Sends due deliveries every `interval` until shutdown.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        steps: Steps,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut rounds = Rounds(self);
        crate::poll::every("webhook deliverer", interval, &shutdown, &mut rounds, steps).await
    }

    /// Takes a round of due deliveries under a fresh lease.
    #[tracing::instrument(name = "claim deliveries", skip_all, err(level = "warn"))]
    async fn claim(&self) -> sqlx::Result<Vec<(Uuid, Due)>> {
        let lease_id = Uuid::new_v4();
        let due = sqlx::query_as!(
            Due,
            "UPDATE webhook_deliveries d
             SET lease_id = $1, leased_until = now() + make_interval(secs => $2)
             FROM webhook_endpoints e
             WHERE e.id = d.endpoint_id AND d.id IN (
                 SELECT id FROM (
                     SELECT c.id, c.next_attempt_at,
                            row_number() OVER (PARTITION BY lower(substring(ce.url FROM '^[^:]+://([^/?#]+)'))
                                               ORDER BY c.next_attempt_at) AS nth
                     FROM (SELECT id, endpoint_id, next_attempt_at FROM webhook_deliveries
                           WHERE status = 'PENDING' AND next_attempt_at <= now()
                             AND (leased_until IS NULL OR leased_until < now())
                           ORDER BY next_attempt_at LIMIT $5
                           FOR UPDATE SKIP LOCKED) c
                     JOIN webhook_endpoints ce ON ce.id = c.endpoint_id
                 ) candidates
                 WHERE nth <= $4
                 ORDER BY next_attempt_at LIMIT $3)
             RETURNING d.id, d.endpoint_id, d.attempts, d.payload, e.url, e.secret, e.enabled,
                       (SELECT o.traceparent FROM orders o WHERE o.id = d.order_id) AS traceparent",
            lease_id,
            self.lease.as_secs_f64(),
            ROUND,
            PER_HOST,
            ROUND * 8
        )
        .fetch_all(&self.db)
        .await?;
        Ok(due.into_iter().map(|delivery| (lease_id, delivery)).collect())
    }

    /// One attempt, in a span that continues the order's trace.
    async fn deliver(&self, (lease_id, delivery): (Uuid, Due)) {
        let span = tracing::info_span!(
            "webhook delivery",
            delivery_id = %delivery.id,
            endpoint_id = %delivery.endpoint_id,
            trace_id = tracing::field::Empty,
        );
        common::telemetry::continue_trace(&span, delivery.traceparent.as_deref());
        self.attempt(lease_id, delivery).instrument(span).await
    }

    async fn attempt(&self, lease_id: Uuid, delivery: Due) {
        if !delivery.enabled {
            let result = sqlx::query!(
                "UPDATE webhook_deliveries SET status = 'ABANDONED', next_attempt_at = NULL, lease_id = NULL,
                        updated_at = now()
                 WHERE id = $1 AND lease_id = $2",
                delivery.id,
                lease_id
            )
            .execute(&self.db)
            .await;
            if let Err(err) = result {
                tracing::warn!(error = %err, delivery_id = %delivery.id, "cannot abandon a delivery");
            }
            return;
        }
        let started = Instant::now();
        let outcome = self.send(&delivery).await;
        let elapsed = started.elapsed();
        metrics::histogram!("turnstile_webhook_delivery_duration_seconds").record(elapsed.as_secs_f64());
        let latency = i32::try_from(elapsed.as_millis()).unwrap_or(i32::MAX);
        if let Err(err) = self.record(lease_id, &delivery, &outcome, latency).await {
            tracing::warn!(error = %err, delivery_id = %delivery.id, "cannot record a webhook attempt; it will be retried");
        }
    }

    async fn send(&self, delivery: &Due) -> AttemptOutcome {
        let url = match self.policy.parse(&delivery.url) {
            Ok(url) => url,
            Err(err) => return AttemptOutcome::Failed { status: None, error: Some(err.to_string()) },
        };
        // Literal addresses never reach the resolver: check them here.
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal.filter(|ip| !self.policy.permits(*ip)) {
            tracing::warn!(endpoint_id = %delivery.endpoint_id, "webhook endpoint's address is not allowed; {NOT_ALLOWED_HINT}");
            return AttemptOutcome::Failed {
                status: None,
                error: Some(format!("address {ip} is not allowed ({NOT_ALLOWED_HINT})")),
            };
        }
        let key =
            match delivery.secret.strip_prefix("whsec_").map(|s| base64::engine::general_purpose::STANDARD.decode(s)) {
                Some(Ok(key)) => SigningKey::new(key),
                _ => {
                    return AttemptOutcome::Failed {
                        status: None,
                        error: Some("the endpoint's secret is unreadable".into()),
                    };
                }
            };
        let webhook_id = delivery.id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = key.sign(&webhook_id, timestamp, delivery.payload.as_bytes());
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(standard_webhooks::HEADER_ID, &webhook_id)
            .header(standard_webhooks::HEADER_TIMESTAMP, timestamp.to_string())
            .header(standard_webhooks::HEADER_SIGNATURE, signature)
            .body(delivery.payload.clone())
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => AttemptOutcome::Delivered(response.status().as_u16()),
            Ok(response) if response.status() == reqwest::StatusCode::GONE => AttemptOutcome::Gone,
            Ok(response) => AttemptOutcome::Failed { status: Some(response.status().as_u16()), error: None },
            Err(err) => AttemptOutcome::Failed { status: None, error: Some(describe(&err)) },
        }
    }

    /// Writes the attempt and what follows from it, if this worker still holds the lease.
    async fn record(
        &self,
        lease_id: Uuid,
        delivery: &Due,
        outcome: &AttemptOutcome,
        latency_ms: i32,
    ) -> sqlx::Result<()> {
        let (status_code, error) = match outcome {
            AttemptOutcome::Delivered(status) => (Some(*status), None),
            AttemptOutcome::Gone => (Some(410), None),
            AttemptOutcome::Failed { status, error } => (*status, error.clone()),
        };
        let mut tx = self.db.begin().await?;
        sqlx::query!(
            "INSERT INTO webhook_attempts (delivery_id, status_code, latency_ms, error) VALUES ($1, $2, $3, $4)",
            delivery.id,
            status_code.map(|s| s as i16),
            latency_ms,
            error.map(|e| e.chars().take(MAX_ERROR_CHARS).collect::<String>())
        )
        .execute(&mut *tx)
        .await?;
        let attempts = delivery.attempts + 1;
        let (status, retry_in) = match outcome {
            AttemptOutcome::Delivered(_) => (DeliveryStatus::Succeeded, None),
            AttemptOutcome::Gone => (DeliveryStatus::Abandoned, None),
            AttemptOutcome::Failed { .. } => {
                match self.schedule.get(usize::try_from(delivery.attempts).unwrap_or(usize::MAX)) {
                    Some(wait) => (DeliveryStatus::Pending, Some(with_jitter(*wait))),
                    None => (DeliveryStatus::Failed, None),
                }
            }
        };
        sqlx::query!(
            "UPDATE webhook_deliveries
             SET status = $3, attempts = $4, lease_id = NULL, leased_until = NULL, updated_at = now(),
                 next_attempt_at = CASE WHEN $3 = 'PENDING' THEN now() + make_interval(secs => $5) END
             WHERE id = $1 AND lease_id = $2",
            delivery.id,
            lease_id,
            status as DeliveryStatus,
            attempts,
            retry_in.unwrap_or_default().as_secs_f64()
        )
        .execute(&mut *tx)
        .await?;
        if matches!(outcome, AttemptOutcome::Gone) {
            // The receiver says the endpoint is gone for good: stop sending to it.
            sqlx::query!(
                "UPDATE webhook_endpoints SET enabled = false, disabled_reason = 'the endpoint answered 410 Gone',
                        updated_at = now()
                 WHERE id = $1",
                delivery.endpoint_id
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query!(
                "UPDATE webhook_deliveries SET status = 'ABANDONED', next_attempt_at = NULL, updated_at = now()
                 WHERE endpoint_id = $1 AND status = 'PENDING' AND lease_id IS NULL",
                delivery.endpoint_id
            )
            .execute(&mut *tx)
            .await?;
            tracing::info!(endpoint_id = %delivery.endpoint_id, "webhook endpoint answered 410; disabled");
        }
        tx.commit().await?;
        let counted = match (outcome, status) {
            (AttemptOutcome::Delivered(_), _) => "delivered",
            (AttemptOutcome::Gone, _) => "gone",
            (AttemptOutcome::Failed { .. }, DeliveryStatus::Failed) => "given_up",
            (AttemptOutcome::Failed { .. }, _) => "retrying",
        };
        metrics::counter!("turnstile_webhook_deliveries_total", "outcome" => counted).increment(1);
        tracing::info!(delivery_id = %delivery.id, attempts, status = status.as_str(), code = status_code, latency_ms, "webhook attempt");
        Ok(())
    }
}

/// `wait` plus up to 20% more, so that retries after an outage do not arrive all at once.
fn with_jitter(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + rand::random_range(0.0..0.2))
}

/// A short, safe description of a failed request: what kind of failure, and the cause.
fn describe(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_redirect() {
        "redirects are not followed"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    if cause.is_empty() { kind.to_owned() } else { format!("{kind}: {cause}") }
}

/// What an attempt refused by the address policy says, so that the endpoint's owner (in the
/// attempt log) and the operator (in the worker's log) both learn which setting decides.
const NOT_ALLOWED_HINT: &str = "private, loopback and other non-public addresses are refused unless the worker's WEBHOOK_ALLOW_NETWORKS lists them";

/// Resolves names with the system resolver and drops every address the policy refuses, so a
/// name that resolves somewhere private is never connected to.
struct GuardedResolver(Arc<TargetPolicy>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> =
                resolved.into_iter().filter(|address| policy.permits(address.ip())).collect();
            if permitted.is_empty() {
                tracing::warn!(
                    host,
                    "webhook endpoint's name resolves only to addresses that are not allowed; {NOT_ALLOWED_HINT}"
                );
                return Err(
                    format!("{host} resolves only to addresses that are not allowed ({NOT_ALLOWED_HINT})").into()
                );
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The deliverer's polling round: a round of due deliveries, sent at once; full rounds go
/// again at once.
struct Rounds(Arc<Deliverer>);

impl Round for Rounds {
    async fn round(&mut self) -> anyhow::Result<Next> {
        let due = self.0.claim().await.context("claiming webhook deliveries")?;
        let full = due.len() == ROUND as usize;
        join_all(due.into_iter().map(|delivery| self.0.deliver(delivery))).await;
        Ok(if full { Next::Again } else { Next::Wait })
    }
}
