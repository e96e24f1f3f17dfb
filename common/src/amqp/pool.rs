//! A pool of broker connections that fails over between a cluster's addresses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, PoolConfig, RecycleError, RecycleResult, Timeouts};
use lapin::ConnectionProperties;

use crate::config::BrokerConfig;

/// A pool of broker connections (see [`pool`]).
pub type Pool = managed::Pool<Manager>;
/// A connection lent by the [`Pool`].
pub type Object = managed::Object<Manager>;

/// How long one broker address may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes the pool's connections: to the first of the broker's addresses that answers,
/// starting from the one that answered last, so that when a node of a cluster goes away,
/// the next connection (a consumer resubscribing, a publisher's retry, the relay) goes to a
/// live one. Everything built on a connection (channels, consumers, publishes awaiting
/// their confirm) fails with it, and its owner retries on a new one.
pub struct Manager {
    addresses: Vec<String>,
    /// The index of the address that answered last.
    current: AtomicUsize,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Addresses carry credentials: only how many there are.
        f.debug_struct("Manager").field("addresses", &self.addresses.len()).finish_non_exhaustive()
    }
}

impl Manager {
    /// `addresses`: one or more AMQP URLs, comma-separated (a cluster's nodes).
    pub fn new(addresses: &str) -> anyhow::Result<Self> {
        let addresses: Vec<String> =
            addresses.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
        anyhow::ensure!(!addresses.is_empty(), "AMQP_URL names no broker address");
        for address in &addresses {
            address
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|err| anyhow::anyhow!("AMQP_URL: an address is not an AMQP URL: {err}"))?;
        }
        Ok(Self { addresses, current: AtomicUsize::new(0) })
    }

    /// Where `address` points, without its credentials, for logs.
    fn host_of(address: &str) -> String {
        address
            .parse::<lapin::uri::AMQPUri>()
            .map_or_else(|_| "?".to_owned(), |uri| format!("{}:{}", uri.authority.host, uri.authority.port))
    }
}

impl managed::Manager for Manager {
    type Type = lapin::Connection;
    type Error = lapin::Error;

    async fn create(&self) -> Result<lapin::Connection, lapin::Error> {
        let first = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..self.addresses.len() {
            let index = (first + step) % self.addresses.len();
            let address = &self.addresses[index];
            let connecting = lapin::Connection::connect(address, ConnectionProperties::default());
            let error = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(connection)) => {
                    if index != first {
                        tracing::info!(broker = Self::host_of(address), "connected to another broker address");
                    }
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(connection);
                }
                Ok(Err(error)) => error,
                Err(_) => lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the broker did not accept the connection in time",
                )),
            };
            if self.addresses.len() > 1 {
                tracing::warn!(broker = Self::host_of(address), error = %error, "broker address unreachable; trying the next");
            }
            last_error = Some(error);
        }
        Err(last_error
            .unwrap_or_else(|| lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into()))
    }

    async fn recycle(&self, connection: &mut lapin::Connection, _: &Metrics) -> RecycleResult<lapin::Error> {
        if connection.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!("the broker connection is lost: {:?}", connection.status())))
        }
    }
}

/// A lazily connecting pool of up to `connections` connections: creating it never touches
/// the network, so a process starts (and reports itself not ready) while the broker is
/// down, and reconnects when it returns, to any of `AMQP_URL`'s addresses (see
/// [`Manager`]). A pooled connection is lent exclusively, so a holder of a long-lived
/// connection (a partition consumer) counts against `connections`.
pub fn pool(config: &BrokerConfig, connections: usize) -> anyhow::Result<Pool> {
    let timeouts = Timeouts {
        wait: Some(Duration::from_secs(5)),
        create: Some(CONNECT_TIMEOUT * 3),
        recycle: Some(Duration::from_secs(5)),
    };
    let manager = Manager::new(config.url.expose())?;
    Ok(Pool::builder(manager)
        .config(PoolConfig { max_size: connections, timeouts, ..PoolConfig::default() })
        .runtime(deadpool::Runtime::Tokio1)
        .build()?)
}
