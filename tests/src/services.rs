//! Where the local services are: their URLs, the workspace, its binaries.

use std::path::PathBuf;
use std::process::Command;

/// The URLs of the local services.
#[derive(Clone, Debug)]
pub struct Services {
    pub database_url: String,
    /// One AMQP URL, or a cluster's nodes' URLs comma-separated.
    pub amqp_url: String,
    /// The management API of each node (one unless RabbitMQ runs as a cluster).
    pub management_urls: Vec<String>,
}

impl Services {
    pub fn from_env() -> Self {
        let file = env_file_values();
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .or_else(|| file.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                .unwrap_or_else(|| {
                    panic!("{name} is not set: start the services with `make services` (or run `make test`)")
                })
        };
        let management = std::env::var("RABBITMQ_MANAGEMENT_URLS")
            .ok()
            .or_else(|| file.iter().find(|(k, _)| k == "RABBITMQ_MANAGEMENT_URLS").map(|(_, v)| v.clone()))
            .unwrap_or_else(|| get("RABBITMQ_MANAGEMENT_URL"));
        Services {
            database_url: get("DATABASE_URL"),
            amqp_url: get("AMQP_URL"),
            management_urls: management
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `KEY=value` pairs of the env file written by `scripts/services.sh` (found by asking it).
fn env_file_values() -> Vec<(String, String)> {
    let path = std::env::var("TURNSTILE_ENV_FILE").map(PathBuf::from).ok().or_else(|| {
        let out = Command::new("bash").arg(workspace_root().join("scripts/services.sh")).arg("env").output().ok()?;
        Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else { return Vec::new() };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ").unwrap_or(line.trim()).split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Path of a workspace binary next to the running test executable (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(format!("TURNSTILE_{}_BIN", name.to_uppercase())) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it first with `cargo build --bins` (make test does)", path.display());
    path
}
