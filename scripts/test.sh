#!/usr/bin/env bash
# `make test`: style checks, then every test (unit and end-to-end) against a real
# PostgreSQL and RabbitMQ started by scripts/services.sh, the compose file's validation, the
# README's runnable recipes against `make run` (scripts/docs-check.sh), then the fault suite
# (the part that restarts services and kills RabbitMQ cluster nodes, on services of its own:
# scripts/chaos.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --check

echo "== services"
bash scripts/services.sh start
# shellcheck disable=SC1090
source "$(bash scripts/services.sh env)"

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== SQL checked at compile time: .sqlx/ matches the queries and the schema"
bash scripts/sqlx.sh check

echo "== build the binaries the end-to-end tests start"
cargo build --workspace --bins --locked

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi

echo "== docker-compose.yml (validated without an engine)"
bash scripts/compose-check.sh

echo "== the README's recipes against make run"
bash scripts/docs-check.sh

echo "== fault suite: service restarts and the RabbitMQ cluster"
bash scripts/chaos.sh --restarts-only
