//! What every handler can reach.

use std::sync::Arc;

use common::config::ApiConfig;
use common::standard_webhooks::SigningKey;
use sqlx::PgPool;

use crate::auth::{HeavyWork, Tokens};
use crate::purchase::catalog::EventCatalog;
use crate::purchase::order_inserter::OrderInserter;
use crate::purchase::order_watch::OrderWatch;
use crate::purchase::sold_out_hints::SoldOutHints;
use crate::revocations::Revocations;
use crate::throttle::Throttle;
use crate::ticket_codes::TicketCodes;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub amqp: common::amqp::Pool,
    /// Stores new orders in shared batches and sends them to the broker (see `order_inserter`).
    pub orders: OrderInserter,
    /// Sends purchase messages (the inserter's, shared): a pre-sale drawn by this process.
    pub publisher: Arc<common::amqp::Publisher>,
    /// What purchases need of events, from memory (see `catalog`).
    pub catalog: Arc<EventCatalog>,
    /// Tickets left per event, recently read (the sold-out fast path's hint).
    pub sold_out: Arc<SoldOutHints>,
    pub order_watch: Arc<OrderWatch>,
    pub tokens: Arc<Tokens>,
    /// Accounts whose older tokens were revoked by a change of role or password.
    pub revocations: Arc<Revocations>,
    /// Password hashing and image decoding, a few at a time (`PASSWORD_HASH_CONCURRENCY`).
    pub heavy_work: Arc<HeavyWork>,
    /// Login attempts per account (`LOGIN_ATTEMPTS_PER_MINUTE`); password checks of
    /// `PATCH /me` count here too.
    pub login_throttle: Arc<Throttle>,
    /// Login attempts per client address (`LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE`).
    pub login_address_throttle: Arc<Throttle>,
    /// Sign-ups per client address (`SIGNUP_PER_MINUTE`).
    pub signup_throttle: Arc<Throttle>,
    /// Signs and checks ticket check-in codes (`TICKET_SECRET`).
    pub ticket_codes: Arc<TicketCodes>,
    /// Where event images are kept (`IMAGE_STORE`).
    pub images: Arc<dyn object_store::ObjectStore>,
    /// The key payment webhooks are signed with (`WEBHOOK_SECRET`).
    pub webhook_key: Arc<SigningKey>,
    /// Set once a supervised background task has stopped: readiness answers 503.
    pub tasks_failed: common::supervise::Failed,
    pub config: Arc<ApiConfig>,
}
