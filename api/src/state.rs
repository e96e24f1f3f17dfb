//! What every handler can reach.

use std::sync::Arc;

use common::config::ApiConfig;
use sqlx::PgPool;

use crate::auth::Tokens;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub amqp: deadpool_lapin::Pool,
    pub tokens: Arc<Tokens>,
    pub config: Arc<ApiConfig>,
}
