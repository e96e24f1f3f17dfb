#!/usr/bin/env bash
# `make chaos`: the fault suite (tests/tests/chaos.rs) under a steady purchase load: the
# worker killed mid-batch, one of two workers killed, api and worker stopped with SIGTERM,
# RabbitMQ restarted, PostgreSQL restarted; then, on RabbitMQ as a cluster of three nodes
# with two api processes and three workers, the node leading the hot partition killed, then
# another node, then an api process. Prints one summary line per fault.
#
# The restarts need services nobody else is using, so this starts a PostgreSQL and a
# RabbitMQ of its own (state under <services state dir>/chaos, ports beside the usual
# ones, below the ephemeral port range), then the same as a cluster of three RabbitMQ
# nodes (ports + 1 and + 2), and stops them at the end.
#
#   scripts/chaos.sh                  every fault
#   scripts/chaos.sh --restarts-only  only the service restarts and the cluster faults
#                                     (`make test` has run the rest)
#
# Settings: CHAOS_PHASE_SECS  how long the load runs before, during and after each fault
#                             (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

base="$(dirname "$(bash scripts/services.sh env)")"
# Ports below the kernel's ephemeral range (32768-60999): while a service is down, clients
# keep reconnecting to its port, and one of those attempts can be given that very port as its
# own local port (a TCP self-connect), which then keeps the service from listening again.
export TURNSTILE_STATE_DIR="$base/chaos" TURNSTILE_PG_PORT=25442 TURNSTILE_AMQP_PORT=27682 \
  TURNSTILE_RABBIT_MGMT_PORT=15690 TURNSTILE_RABBIT_DIST_PORT=25690 TURNSTILE_EPMD_PORT=4390 \
  TURNSTILE_RABBIT_NODE=turnstile-chaos@localhost
export TURNSTILE_ENV_FILE="$TURNSTILE_STATE_DIR/env"

echo "== services for the fault suite (PostgreSQL :$TURNSTILE_PG_PORT, RabbitMQ :$TURNSTILE_AMQP_PORT)"
bash scripts/services.sh start
trap 'bash scripts/services.sh stop' EXIT
# shellcheck disable=SC1090
source "$TURNSTILE_ENV_FILE"

which=all
[ "${1:-}" = --restarts-only ] && which=only

summary="$TURNSTILE_STATE_DIR/summary.txt"
: > "$summary"
export TURNSTILE_CHAOS=1 TURNSTILE_CHAOS_SUMMARY="$summary"

cargo build --workspace --bins --locked
# faults FILTER: the fault tests whose names FILTER (`cluster`, or `!cluster` for the others) selects.
faults() {
  if cargo nextest --version >/dev/null 2>&1; then
    local expr="test(/cluster/)"
    [ "$1" = cluster ] || expr="not $expr"
    cargo nextest run --workspace --test chaos --locked --no-fail-fast --run-ignored "$which" --test-threads 1 -E "$expr"
  else
    local select=(cluster)
    [ "$1" = cluster ] || select=(--skip cluster)
    cargo test --workspace --test chaos --locked --no-fail-fast -- "$([ $which = all ] && echo --include-ignored || echo --ignored)" --test-threads 1 "${select[@]}"
  fi
}
status=0
echo "== faults under load"
faults '!cluster' || status=$?

echo "== RabbitMQ as a cluster of three nodes (ports $TURNSTILE_AMQP_PORT-$((TURNSTILE_AMQP_PORT + 2)))"
bash scripts/services.sh stop rabbitmq
# Exported: the tests kill and start the nodes through services.sh too.
export TURNSTILE_RABBIT_NODES=3
bash scripts/services.sh start
# shellcheck disable=SC1090
source "$TURNSTILE_ENV_FILE"
echo "== faults on the cluster"
faults cluster || status=$?
echo "== fault summary"
cat "$summary"
exit "$status"
