#!/usr/bin/env bash
# `make test`: the lint (scripts/lint.sh), then every test (unit and end-to-end) against a real
# PostgreSQL and RabbitMQ started by scripts/services.sh, the compose file's validation, the
# README's runnable recipes against `make run` (scripts/docs-check.sh), then the fault suite
# (the part that restarts services and kills RabbitMQ cluster nodes, on services of its own:
# scripts/chaos.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests drop their databases and virtual hosts (`t_<uuid>`) when they end, and keep the
# migrated template their databases are copied from (`t_template_<hash>`); a run that was
# killed leaves databases and virtual hosts behind. This drops them all before a run (the
# first test makes the template again).
sweep_test_leftovers() {
  local name
  psql "$DATABASE_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 't\_%'" |
    while read -r name; do psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)"; done
  curl -fsS "$RABBITMQ_MANAGEMENT_URL/api/vhosts?columns=name" |
    python3 -c 'import json, sys; print("\n".join(v["name"] for v in json.load(sys.stdin) if v["name"].startswith("t_")))' |
    while read -r name; do
      if [ -n "$name" ]; then curl -fsS -X DELETE "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$name"; fi
    done
  return 0
}

echo "== lint: formatting, clippy, the API docs, the scripts (scripts/lint.sh, as make lint)"
bash scripts/lint.sh

echo "== services"
bash scripts/services.sh start
# shellcheck disable=SC1090
source "$(bash scripts/services.sh env)"

echo "== leftovers of aborted runs: test databases and virtual hosts (t_*)"
sweep_test_leftovers

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
