//! What every handler can reach.

use std::sync::Arc;

use common::amqp::Publisher;
use common::config::ApiConfig;
use common::standard_webhooks::SigningKey;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::Tokens;
use crate::pipeline::{OrderInserter, OrderWatch, SoldOutHints};
use crate::throttle::Throttle;
use crate::ticket_codes::TicketCodes;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub amqp: deadpool_lapin::Pool,
    pub publisher: Arc<Publisher>,
    /// Stores new orders in shared batches (see `pipeline`).
    pub orders: OrderInserter,
    /// Tickets left per event, recently read (the sold-out fast path's hint).
    pub sold_out: Arc<SoldOutHints>,
    /// Orders whose purchase message the broker confirmed (see `pipeline`).
    pub published: mpsc::Sender<Uuid>,
    pub order_watch: Arc<OrderWatch>,
    pub tokens: Arc<Tokens>,
    /// Login attempts per account (`LOGIN_ATTEMPTS_PER_MINUTE`).
    pub login_throttle: Arc<Throttle>,
    /// Sign-ups per client address (`SIGNUP_PER_MINUTE`).
    pub signup_throttle: Arc<Throttle>,
    /// Signs and checks ticket check-in codes (`TICKET_SECRET`).
    pub ticket_codes: Arc<TicketCodes>,
    /// Where event images are kept (`IMAGE_STORE`).
    pub images: Arc<dyn object_store::ObjectStore>,
    /// The key payment webhooks are signed with (`WEBHOOK_SECRET`).
    pub webhook_key: Arc<SigningKey>,
    pub config: Arc<ApiConfig>,
}
