//! Typed configuration, read from the environment (or the matching command-line flags) and
//! validated once at start-up, so a process either starts with a coherent configuration or
//! refuses to start with a message that says what to fix.
//!
//! Secrets have no defaults: `JWT_SECRET`, `WEBHOOK_SECRET` and `TICKET_SECRET` must be set
//! and at least [`MIN_SECRET_BYTES`] long.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;

/// The shortest secret accepted for HMAC keys (JWT signing, payment webhooks).
pub const MIN_SECRET_BYTES: usize = 32;

/// A configuration value that must never be printed: its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's text, for the one place that needs it (a key, a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A start-up configuration problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Connection to PostgreSQL.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseConfig {
    /// PostgreSQL URL, e.g. postgres://user:password@127.0.0.1:5432/turnstile
    #[arg(
        id = "database_url",
        long = "database-url",
        value_name = "URL",
        env = "DATABASE_URL",
        hide_env_values = true
    )]
    pub url: Secret,
    /// Largest number of pooled database connections.
    #[arg(id = "database_max_connections", long = "database-max-connections", value_name = "N", env = "DATABASE_MAX_CONNECTIONS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,
    /// Pooled database connections opened at start-up and kept open while idle (at most
    /// `DATABASE_MAX_CONNECTIONS`), so that the first requests after a start do not wait for
    /// new connections (a server process each).
    #[arg(id = "database_min_connections", long = "database-min-connections", value_name = "N", env = "DATABASE_MIN_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub min_connections: u32,
}

/// Connection to RabbitMQ and the shape of the purchase topology.
#[derive(Clone, Debug, clap::Args)]
pub struct BrokerConfig {
    /// AMQP URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(id = "amqp_url", long = "amqp-url", value_name = "URL", env = "AMQP_URL", hide_env_values = true)]
    pub url: Secret,
    /// Number of purchase partitions (queues `orders.purchase.{k}`). Every process of one
    /// deployment must use the same value.
    #[arg(long = "partitions", env = "PARTITIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,
}

/// Where webhook endpoints may point. Private, loopback, link-local and other non-public
/// addresses are refused (server-side request forgery), unless listed here.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct WebhookTargetConfig {
    /// Non-public networks webhook endpoints may still point at, as comma-separated CIDRs
    /// (e.g. `127.0.0.1/32` to test against a local receiver). Empty by default.
    #[arg(
        long = "webhook-allow-networks",
        env = "WEBHOOK_ALLOW_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub allow_networks: Vec<ipnet::IpNet>,
}

/// The waiting list's offers, made by whichever process releases tickets (api and worker:
/// give both the same value).
#[derive(Clone, Debug, clap::Args)]
pub struct WaitlistConfig {
    /// How long tickets offered to a waiting-list entry are held for its buyer to pay, in
    /// seconds; then the offer lapses and passes to the next entry.
    #[arg(long = "waitlist-offer-ttl-secs", env = "WAITLIST_OFFER_TTL_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub offer_ttl_secs: u64,
}

impl WaitlistConfig {
    pub fn offer_ttl(&self) -> Duration {
        Duration::from_secs(self.offer_ttl_secs)
    }
}

/// Everything the `api` process needs to serve HTTP.
#[derive(Clone, Debug, clap::Args)]
pub struct ApiConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub broker: BrokerConfig,
    #[command(flatten)]
    pub waitlist: WaitlistConfig,
    #[command(flatten)]
    pub webhook_targets: WebhookTargetConfig,
    /// Address the HTTP server binds to (port 0 picks a free port).
    #[arg(long = "bind-addr", env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint, apart from the public API (port 0
    /// picks a free port).
    #[arg(long = "metrics-addr", env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// HMAC key for access tokens (HS256), at least 32 bytes.
    #[arg(long = "jwt-secret", env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
    /// Key that payment providers sign webhooks with: at least 32 bytes, raw or in the
    /// Standard Webhooks `whsec_<base64>` form.
    #[arg(long = "webhook-secret", env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Secret,
    /// HMAC key of ticket check-in codes, at least 32 bytes. Changing it invalidates every
    /// code already handed out.
    #[arg(long = "ticket-secret", env = "TICKET_SECRET", hide_env_values = true)]
    pub ticket_secret: Secret,
    /// Where uploaded event images are kept: a local directory (created if missing), or
    /// `s3://bucket[/prefix]` for an S3-compatible store configured by the usual `AWS_*`
    /// variables (`AWS_ENDPOINT` for a non-AWS one).
    #[arg(long = "image-store", env = "IMAGE_STORE", default_value = "data/images")]
    pub image_store: String,
    /// Paid orders refunded per transaction when an event is deleted with `?refund=true`.
    #[arg(long = "deletion-refund-batch", env = "DELETION_REFUND_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub deletion_refund_batch: i64,
    /// Largest accepted event image, in bytes (larger uploads get 413).
    #[arg(long = "image-max-bytes", env = "IMAGE_MAX_BYTES", default_value_t = 5_242_880,
          value_parser = clap::value_parser!(u64).range(1024..=104_857_600))]
    pub image_max_bytes: u64,
    /// Origins whose browser pages may call the API (CORS), comma-separated, e.g.
    /// `https://shop.example.com`; `*` allows any origin. None by default: no CORS headers.
    #[arg(
        long = "cors-allowed-origins",
        env = "CORS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN,..."
    )]
    pub cors_allowed_origins: Vec<String>,
    /// Issuer (`iss`) written into and required from access tokens.
    #[arg(long = "jwt-issuer", env = "JWT_ISSUER", default_value = "turnstile")]
    pub jwt_issuer: String,
    /// Lifetime of an access token, in seconds.
    #[arg(long = "jwt-ttl-secs", env = "JWT_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(60..=604_800))]
    pub jwt_ttl_secs: u64,
    /// Largest accepted request body, in bytes (larger bodies get 413).
    #[arg(long = "body-limit-bytes", env = "BODY_LIMIT_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1024..=10_485_760))]
    pub body_limit_bytes: u64,
    /// Time limit for one request, in seconds (503 past it).
    #[arg(long = "request-timeout-secs", env = "REQUEST_TIMEOUT_SECS", default_value_t = 35,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout_secs: u64,
    /// Longest a connection may take to send a request's headers, in seconds, counted from
    /// when it opened or its previous response was sent: it bounds slow headers (slowloris)
    /// and idle keep-alive connections alike; past it the connection is closed.
    #[arg(long = "http-header-timeout-secs", env = "HTTP_HEADER_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub http_header_timeout_secs: u64,
    /// Most client connections held open at once. At the limit, a new connection closes the
    /// one idle the longest (no request in flight: keep-alive or still sending headers); when
    /// every connection has a request in flight, the new one is closed at once. Keep it well
    /// below the process's open-file limit (`ulimit -n`), which the pools share.
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(8..=1_000_000))]
    pub http_max_connections: u64,
    /// The per-buyer cap (`max_per_buyer`) of events created without one; 0: the event's own
    /// `max_per_order`. An event is uncapped only when created or edited with
    /// `"max_per_buyer": null`.
    #[arg(long = "default-max-per-buyer", env = "DEFAULT_MAX_PER_BUYER", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub default_max_per_buyer: u64,
    /// Answer `409 sold_out` at once when the event has fewer tickets left than asked for
    /// (a hint; the worker stays the authority).
    #[arg(long = "sold-out-fast-path", env = "SOLD_OUT_FAST_PATH", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub sold_out_fast_path: bool,
    /// Queue full: a new order is refused at once with `409 queue_full` when the tickets
    /// asked for by its event's queued orders (its own included) would pass this many times
    /// what the event has left. Decimals allowed (at least 1, at most 10000); 0 turns it off.
    /// An event's `queue_demand_factor` overrides it.
    #[arg(long = "queue-demand-factor", env = "QUEUE_DEMAND_FACTOR", default_value_t = 3.0,
          value_parser = parse_demand_factor)]
    pub queue_demand_factor: f64,
    /// The least time, in milliseconds, from the start of one shared `INSERT` of new orders
    /// to the next. Orders arriving one by one then share a statement (and a commit) instead
    /// of each taking one, at the cost of waiting up to this long when they come in steadily;
    /// a stampede's statements take longer than this anyway, and a lone order is stored at
    /// once. 0: each statement starts as soon as the previous one ended.
    #[arg(long = "order-insert-interval-ms", env = "ORDER_INSERT_INTERVAL_MS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub order_insert_interval_ms: u64,
    /// The least time, in milliseconds, from one sending of purchase messages to the next: the
    /// orders stored meanwhile go out together, one message per partition. Answers do not
    /// wait for it (a stored order is the promise: one whose message never reaches the
    /// broker is the re-publisher's); decisions do. 0: sent as soon as stored.
    #[arg(long = "purchase-send-interval-ms", env = "PURCHASE_SEND_INTERVAL_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub purchase_send_interval_ms: u64,
    /// How many orders fill a partition's purchase message: a partition's stored orders are
    /// sent once there are this many, or once `PURCHASE_SEND_MAX_WAIT_MS` has passed since its
    /// last message, whichever comes first. 128: one event selling 4,000 orders a second fills
    /// a message in 32 ms, inside the 40 ms wait, so its worker gets a message and a decision
    /// transaction per 128 orders instead of per 32.
    #[arg(long = "purchase-message-orders", env = "PURCHASE_MESSAGE_ORDERS", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub purchase_message_orders: u64,
    /// The longest, in milliseconds, a partition's stored orders wait for more to fill its
    /// message (`PURCHASE_MESSAGE_ORDERS`), counted from its last message: when orders of many
    /// events spread over the partitions, each message then carries several instead of one
    /// or two. A partition quiet for this long sends its next order at once. 0: every
    /// partition at every sending.
    #[arg(long = "purchase-send-max-wait-ms", env = "PURCHASE_SEND_MAX_WAIT_MS", default_value_t = 40,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub purchase_send_max_wait_ms: u64,
    /// How long the fast path trusts an event's tickets-left count read from the database,
    /// in milliseconds, before reading it again. During that time a sold-out event costs
    /// the database nothing, and tickets released meanwhile may be refused; 0 reads on every
    /// request.
    #[arg(long = "sold-out-hint-ms", env = "SOLD_OUT_HINT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub sold_out_hint_ms: u64,
    /// Login attempts allowed per account (email) and minute; more get `429` with
    /// `Retry-After` until the allowance refills (one attempt every 60 s / this).
    #[arg(long = "login-attempts-per-minute", env = "LOGIN_ATTEMPTS_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub login_attempts_per_minute: u32,
    /// Login attempts allowed per client address and minute, whatever the accounts; more
    /// get `429` with `Retry-After`.
    #[arg(long = "login-attempts-per-address-per-minute", env = "LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE",
          default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub login_attempts_per_address_per_minute: u32,
    /// Password hashes (log-in, sign-up, password change) computed at once; each takes 19 MiB
    /// and one core for tens of milliseconds. 0: one per core. Requests wait up to 2 s for
    /// a slot, then get `503 busy`.
    #[arg(long = "password-hash-concurrency", env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=256))]
    pub password_hash_concurrency: u16,
    /// Sign-ups allowed per client address and minute; more get `429` with `Retry-After`.
    #[arg(long = "signup-per-minute", env = "SIGNUP_PER_MINUTE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub signup_per_minute: u32,
}

impl ApiConfig {
    /// Checks what the flag parser cannot: secret lengths, origins. Call once at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for origin in self.cors_allowed_origins.iter().filter(|o| o.as_str() != "*") {
            let parsed = url::Url::parse(origin).ok();
            // A host of letters, digits, `-` and `.` (or an address): a pattern such as
            // `http://*.example.com` parses as a URL but matches no browser's origin.
            let plain_host = |url: &url::Url| match url.host() {
                Some(url::Host::Domain(name)) => {
                    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                }
                Some(_) => true,
                None => false,
            };
            let valid = parsed.as_ref().is_some_and(|url| {
                matches!(url.scheme(), "http" | "https")
                    && url.path() == "/"
                    && !origin.ends_with('/')
                    && plain_host(url)
            });
            if !valid {
                return Err(ConfigError(format!(
                    "CORS_ALLOWED_ORIGINS: {origin:?} is not an origin (scheme://host[:port], no path, no wildcard: \
                     list each origin, or `*` for any)"
                )));
            }
        }
        check_secret("JWT_SECRET", self.jwt_secret.expose().as_bytes())?;
        check_secret("TICKET_SECRET", self.ticket_secret.expose().as_bytes())?;
        webhook_key(&self.webhook_secret).map(|_| ())
    }

    pub fn sold_out_hint(&self) -> Duration {
        Duration::from_millis(self.sold_out_hint_ms)
    }

    pub fn jwt_ttl(&self) -> Duration {
        Duration::from_secs(self.jwt_ttl_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_secs(self.http_header_timeout_secs)
    }
}

/// How order events are published (see `ORDER_EVENTS_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventsFormat {
    /// Several events of one type per message (version 2).
    Batch,
    /// One event per message (version 1).
    Single,
}

/// Everything the `worker` process needs.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub broker: BrokerConfig,
    #[command(flatten)]
    pub waitlist: WaitlistConfig,
    /// A batch takes purchase messages until they name about this many orders; the batches
    /// waiting at once are decided in one transaction.
    #[arg(long = "batch-size", env = "BATCH_SIZE", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch_size: u16,
    /// How long a batch waits for more messages after its first one, in milliseconds.
    #[arg(long = "batch-wait-ms", env = "BATCH_WAIT_MS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_wait_ms: u64,
    /// How long allocated tickets are held for payment before the order expires, in seconds.
    #[arg(long = "hold-ttl-secs", env = "HOLD_TTL_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub hold_ttl_secs: u64,
    /// A `QUEUED` order is published again once it has waited this many seconds and its
    /// partition's queue is empty, or its partition's consumer has passed orders stored this
    /// many seconds after it (see `republish`); and at most once per this many seconds.
    #[arg(long = "republish-after-secs", env = "REPUBLISH_AFTER_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub republish_after_secs: u64,
    /// A `QUEUED` order is published again after this many seconds whatever its partition's
    /// queue holds (its message may have been purged or lost with the broker's disk).
    #[arg(long = "republish-stale-secs", env = "REPUBLISH_STALE_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub republish_stale_secs: u64,
    /// How often the re-publisher looks for orders to publish again, in milliseconds.
    #[arg(long = "republish-interval-ms", env = "REPUBLISH_INTERVAL_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub republish_interval_ms: u64,
    /// How often unpaid holds past `expires_at` are looked for and expired, in milliseconds.
    #[arg(long = "expiry-interval-ms", env = "EXPIRY_INTERVAL_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub expiry_interval_ms: u64,
    /// How often status changes are relayed to the `orders.events` exchange and turned into
    /// webhook deliveries, in milliseconds (a full batch is followed by the next at once).
    #[arg(long = "events-relay-interval-ms", env = "EVENTS_RELAY_INTERVAL_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub events_relay_interval_ms: u64,
    /// How order events are published to `orders.events`: `batch` puts the events of one
    /// relay round that share a type in one message (version 2: `{"version": 2, "type",
    /// "events": [...]}`), `single` sends one message per event (version 1).
    #[arg(long = "order-events-format", env = "ORDER_EVENTS_FORMAT", value_enum, default_value_t = EventsFormat::Batch)]
    pub order_events_format: EventsFormat,
    #[command(flatten)]
    pub webhook_targets: WebhookTargetConfig,
    /// Waits between webhook delivery attempts: after the first failure the first wait, and
    /// so on; when the list runs out the delivery is given up (`FAILED`). Each wait gets up
    /// to 20% random jitter.
    #[arg(long = "webhook-retry-schedule", env = "WEBHOOK_RETRY_SCHEDULE", value_delimiter = ',',
          default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = humantime::parse_duration, value_name = "DURATIONS")]
    pub webhook_retry_schedule: Vec<Duration>,
    /// How long a webhook endpoint has to answer, in seconds (longer counts as a failure).
    #[arg(long = "webhook-timeout-secs", env = "WEBHOOK_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_secs: u64,
    /// How often due webhook deliveries are looked for, in milliseconds.
    #[arg(long = "webhook-poll-interval-ms", env = "WEBHOOK_POLL_INTERVAL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub webhook_poll_interval_ms: u64,
    /// How often a worker refreshes its heartbeat and recomputes which partitions it
    /// prefers, in milliseconds. A worker unheard of for 5 heartbeats counts as gone.
    #[arg(long = "heartbeat-ms", env = "HEARTBEAT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub heartbeat_ms: u64,
    /// Address of the worker's HTTP server: Prometheus `/metrics`, `/health/live` and
    /// `/health/ready` (port 0 picks a free port).
    #[arg(long = "metrics-addr", env = "METRICS_ADDR", default_value = "127.0.0.1:9465")]
    pub metrics_addr: SocketAddr,
}

impl WorkerConfig {
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    pub fn hold_ttl(&self) -> Duration {
        Duration::from_secs(self.hold_ttl_secs)
    }

    pub fn expiry_interval(&self) -> Duration {
        Duration::from_millis(self.expiry_interval_ms)
    }

    pub fn events_relay_interval(&self) -> Duration {
        Duration::from_millis(self.events_relay_interval_ms)
    }

    pub fn webhook_poll_interval(&self) -> Duration {
        Duration::from_millis(self.webhook_poll_interval_ms)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

/// The HMAC key bytes of a webhook secret: `whsec_<base64>` (Standard Webhooks) is decoded,
/// anything else is taken as raw bytes.
pub fn webhook_key(secret: &Secret) -> Result<Vec<u8>, ConfigError> {
    let raw = secret.expose();
    let key = match raw.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| ConfigError("WEBHOOK_SECRET starts with whsec_ but the rest is not valid base64".into()))?,
        None => raw.as_bytes().to_vec(),
    };
    check_secret("WEBHOOK_SECRET", &key)?;
    Ok(key)
}

fn check_secret(name: &str, bytes: &[u8]) -> Result<(), ConfigError> {
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(ConfigError(format!(
            "{name} must be at least {MIN_SECRET_BYTES} bytes (it has {}); generate one with \
             `openssl rand -base64 48`",
            bytes.len()
        )));
    }
    Ok(())
}

/// `QUEUE_DEMAND_FACTOR`: 0 (off), or 1 to 10000.
fn parse_demand_factor(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(factor) if factor == 0.0 || (1.0..=10_000.0).contains(&factor) => Ok(factor),
        _ => Err("expected 0 (off) or a number from 1 to 10000".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: ApiConfig,
    }

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    fn parse(extra: &[&str]) -> Result<ApiConfig, clap::Error> {
        let mut args = vec![
            "api",
            "--database-url",
            "postgres://localhost/x",
            "--amqp-url",
            "amqp://localhost",
            "--ticket-secret",
            "ticket-secret-0123456789abcdef0123",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).map(|c| c.api)
    }

    #[test]
    fn secrets_are_required() {
        let err = parse(&["--jwt-secret", GOOD]).expect_err("missing webhook secret");
        assert!(err.to_string().contains("--webhook-secret"), "{err}");
        let err = parse(&["--webhook-secret", GOOD]).expect_err("missing jwt secret");
        assert!(err.to_string().contains("--jwt-secret"), "{err}");
    }

    #[test]
    fn short_secrets_are_refused_without_echoing_them() {
        let cfg = parse(&["--jwt-secret", "short-secret", "--webhook-secret", GOOD]).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("JWT_SECRET must be at least 32 bytes"), "{err}");
        assert!(!err.contains("short-secret"), "error leaks the secret: {err}");
    }

    #[test]
    fn whsec_secrets_are_decoded() {
        let encoded = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let secret = Secret::new(format!("whsec_{encoded}"));
        assert_eq!(webhook_key(&secret).unwrap(), vec![7u8; 32]);
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(webhook_key(&Secret::new(format!("whsec_{short}"))).is_err());
        assert!(webhook_key(&Secret::new("whsec_not base64!")).is_err());
    }

    #[test]
    fn valid_config_passes_and_debug_redacts() {
        let cfg = parse(&["--jwt-secret", GOOD, "--webhook-secret", GOOD]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.broker.partitions, 8);
        assert!(!format!("{cfg:?}").contains(GOOD));
    }

    #[test]
    fn the_queue_demand_factor_is_off_or_at_least_one() {
        let factor = |value: &str| {
            parse(&["--jwt-secret", GOOD, "--webhook-secret", GOOD, "--queue-demand-factor", value])
                .map(|cfg| cfg.queue_demand_factor)
        };
        assert_eq!(parse(&["--jwt-secret", GOOD, "--webhook-secret", GOOD]).unwrap().queue_demand_factor, 3.0);
        assert_eq!(factor("0").unwrap(), 0.0);
        assert_eq!(factor("1.5").unwrap(), 1.5);
        for refused in ["0.5", "-1", "10001", "NaN", "inf", "three"] {
            assert!(factor(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn partitions_must_be_in_range() {
        assert!(parse(&["--jwt-secret", GOOD, "--webhook-secret", GOOD, "--partitions", "0"]).is_err());
    }
}
