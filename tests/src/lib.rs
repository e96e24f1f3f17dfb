//! Test harness for the end-to-end tests: every test gets its own PostgreSQL database, its
//! own RabbitMQ virtual host and its own api on a random port, so tests run in parallel and
//! leave nothing behind.
//!
//! The api runs in the test's own process ([`TestApp::spawn`]: `api::Application`, the
//! library the binary runs), or as the real binary where a test needs a process: its logs,
//! its metrics, its pid, signals, or several apis at once ([`TestApp::spawn_process`]).
//! Workers too: in-process ([`TestApp::worker`]: `worker::Worker`, with settings changed by
//! type and polling loops a test can step), or as processes ([`TestApp::spawn_worker`]),
//! which tests kill, signal and read the logs and metrics of.
//!
//! The services come from `scripts/services.sh start` (which `make test` runs); their URLs
//! are read from the environment or, failing that, from the env file that script writes.

mod app;
mod broker;
mod checks;
mod db;
mod in_process;
mod metrics;
mod process;
mod requests;
mod services;

pub use app::{TestApp, worker_decides};
pub use broker::{Management, TestBroker, bind_order_events};
pub use db::TestDb;
pub use in_process::{InProcessApi, InProcessWorker};
pub use metrics::Exposition;
pub use process::{Process, run};
pub use requests::{Response, mint_token, refused_within_a_second, sign_webhook};
pub use services::{Services, binary, workspace_root};

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef012345";
pub const TICKET_SECRET: &str = "test-ticket-secret-0123456789abcdef0123456";
pub const PASSWORD: &str = "correct horse battery";
