#!/usr/bin/env bash
# `make chaos`: the fault suite (tests/tests/chaos/) under a steady purchase load: the
# worker killed mid-batch, one of two workers killed, api and worker stopped with SIGTERM,
# RabbitMQ restarted, PostgreSQL restarted; then, on RabbitMQ as a cluster of three nodes
# with two api processes and three workers, the node leading the hot partition killed, then
# another node, then an api process; then, on PostgreSQL as a Patroni cluster of three
# members behind HAProxy (scripts/ha.sh) with two api processes and two workers, the
# database faults (the leader killed, ...). Prints one summary line per fault.
#
# The restarts need services nobody else is using, so this starts a PostgreSQL and a
# RabbitMQ of its own (state under <services state dir>/chaos, ports beside the usual
# ones, below the ephemeral port range), then the same as a cluster of three RabbitMQ
# nodes (ports + 1 and + 2), and stops them at the end.
#
#   scripts/chaos.sh                  every fault
#   scripts/chaos.sh --restarts-only  only the service restarts, the cluster faults and
#                                     the PostgreSQL leader kill (`make test` has run the
#                                     process faults)
#   scripts/chaos.sh --async-replication
#                                     only the PostgreSQL leader kill, on a Patroni cluster
#                                     with asynchronous standbys: acknowledged orders may be
#                                     lost, and the summary reports what the checker saw
#                                     (the checker's own test; it does not fail on losses)
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

which=all mode=all
case "${1:-}" in
  --restarts-only) which=only mode=restarts ;;
  --async-replication) mode=async ;;
  "") ;;
  *) echo "usage: $0 [--restarts-only|--async-replication]" >&2; exit 2 ;;
esac

summary="$TURNSTILE_STATE_DIR/summary.txt"
: > "$summary"
export TURNSTILE_CHAOS=1 TURNSTILE_CHAOS_SUMMARY="$summary"

cargo build --workspace --bins --locked
# faults FILTER: the fault tests FILTER selects, a nextest filter expression.
faults() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --test chaos --locked --no-fail-fast --run-ignored "$which" --test-threads 1 -E "$1"
  else
    # Without nextest: cargo test's name filter (the expression's first /pattern/).
    local pattern
    pattern="$(sed -E 's|.*test\(/([^/]*)/\).*|\1|' <<<"$1")"
    cargo test --workspace --test chaos --locked --no-fail-fast -- "$([ $which = all ] && echo --include-ignored || echo --ignored)" --test-threads 1 "$pattern"
  fi
}

# The PostgreSQL faults: PostgreSQL as a fresh Patroni cluster (HAProxy on the same port),
# the faults FILTER selects on it; it is stopped afterwards.
database_faults() {
  echo "== PostgreSQL as a Patroni cluster of three ($TURNSTILE_PG_HA_SYNC replication; HAProxy :$TURNSTILE_PG_PORT)"
  bash scripts/services.sh stop postgres
  rm -rf "$TURNSTILE_STATE_DIR/ha"
  export TURNSTILE_PG_HA=1
  bash scripts/services.sh start postgres
  # shellcheck disable=SC1090
  source "$TURNSTILE_ENV_FILE"
  echo "== faults on the Patroni cluster"
  faults "$1" || status=$?
  bash scripts/services.sh stop postgres
  export TURNSTILE_PG_HA=0
}

status=0
if [ "$mode" = async ]; then
  export TURNSTILE_PG_HA_SYNC=off
  database_faults 'test(/patroni_leader_killed/)'
  echo "== fault summary"
  cat "$summary"
  exit "$status"
fi
export TURNSTILE_PG_HA_SYNC=quorum

echo "== faults under load"
faults 'not test(/cluster/) and not test(/patroni/)' || status=$?

echo "== RabbitMQ as a cluster of three nodes (ports $TURNSTILE_AMQP_PORT-$((TURNSTILE_AMQP_PORT + 2)))"
bash scripts/services.sh stop rabbitmq
# Exported: the tests kill and start the nodes through services.sh too.
export TURNSTILE_RABBIT_NODES=3
bash scripts/services.sh start
# shellcheck disable=SC1090
source "$TURNSTILE_ENV_FILE"
echo "== faults on the cluster"
faults 'test(/cluster/)' || status=$?

# `make test` runs the leader kill; `make chaos` every database fault.
if [ "$mode" = restarts ]; then
  database_faults 'test(/patroni_leader_killed/)'
else
  database_faults 'test(/patroni/)'
fi
echo "== fault summary"
cat "$summary"
exit "$status"
