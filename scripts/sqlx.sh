#!/usr/bin/env bash
# Compile-time checked SQL. The `sqlx::query!` family of macros checks each query against
# the schema while compiling; builds read the schema's answers from `.sqlx/` (committed;
# `SQLX_OFFLINE=true` in .cargo/config.toml), so they need no database. After changing a
# query or a migration, regenerate `.sqlx/`:
#
#   scripts/sqlx.sh prepare   describe every query against a freshly migrated database and
#                             write .sqlx/ (commit it)
#   scripts/sqlx.sh check     fail if .sqlx/ is not what `prepare` would write (make test)
#
# sqlx-cli is installed once (cargo install, a few minutes) into the services' state
# directory; the database comes from scripts/services.sh (started if need be).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.9.0
mode="${1:-}"
case "$mode" in prepare | check) ;; *) echo "usage: $0 prepare|check" >&2; exit 2 ;; esac

env_file="$(bash scripts/services.sh env)"
tools="$(dirname "$env_file")/tools"
if ! "$tools/bin/sqlx" --version 2>/dev/null | grep -qF "$VERSION"; then
  echo "[sqlx] installing sqlx-cli $VERSION into $tools (once)"
  cargo install --quiet --locked --root "$tools" sqlx-cli --version "=$VERSION" \
    --no-default-features --features postgres,rustls
fi
export PATH="$tools/bin:$PATH"

[ -f "$env_file" ] || bash scripts/services.sh start
# shellcheck disable=SC1090
source "$env_file"
# A database of its own at the current schema, made afresh each time.
export DATABASE_URL="${DATABASE_URL%/*}/turnstile_sqlx"
sqlx database drop -y >/dev/null 2>&1 || true
sqlx database create
sqlx migrate run --source migrations >/dev/null

# The macros must reach the database here, whatever .cargo/config.toml says.
export SQLX_OFFLINE=false
if [ "$mode" = check ]; then
  cargo sqlx prepare --workspace --check -- --all-targets --locked
else
  cargo sqlx prepare --workspace -- --all-targets --locked
  echo "[sqlx] .sqlx/ written: commit it with the queries"
fi
sqlx database drop -y >/dev/null
