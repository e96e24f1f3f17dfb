//! The RabbitMQ connection pool shared by api and worker.

use deadpool_lapin::{Config, Pool, Runtime};
use lapin::ConnectionProperties;

use crate::config::BrokerConfig;

/// A lazily connecting pool: creating it never touches the network, so a process starts
/// (and reports itself not ready) while the broker is down, and reconnects when it returns.
pub fn pool(config: &BrokerConfig) -> anyhow::Result<Pool> {
    let cfg = Config { url: Some(config.url.expose().to_owned()), ..Config::default() };
    Ok(cfg.create_pool(ConnectionProperties::default, Runtime::Tokio1)?)
}
