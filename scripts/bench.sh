#!/usr/bin/env bash
# `make bench`: measure the purchase path next to the synchronous baseline.
#
# Starts PostgreSQL + RabbitMQ (as `make run` does), builds the release binaries, and for
# each run of each scenario: a fresh database and RabbitMQ virtual host, a fresh api and
# worker, one `loadgen run`. Then `loadgen summary` prints medians and ratios, also written
# to bench-results/<time>/summary.md next to each run's JSON.
#
# Settings (environment or make variables):
#   SCENARIOS     scenarios to run, in this order, RUNS times over (default "baseline hot");
#                 hot, spread, tiers (hot's shape on three ticket types, orders of one to
#                 three lines), rate, steady (a normal day: rate's open loop at 1,000
#                 orders/s over 1,000 events of 20 tickets each), backlog, prequeue (hot's
#                 shape as pre-sale entries, one per buyer, then the opening: the draw's time
#                 and the decisions after it; the worker looks for due draws every 100 ms),
#                 baseline (shaped like hot), baseline-spread (shaped like spread), ceiling
#                 (the api's fixed work alone: POST /api/v1/orders/quote, no database or
#                 broker)
#   RUNS          runs of each scenario (default 3)
#   LOADGEN_ARGS  extra `loadgen run` arguments, after the scenario's defaults, e.g.
#                 "--capacity 1000 --concurrency 32"
#   FAST_PATH     the api's SOLD_OUT_FAST_PATH (default false: every order goes through the
#                 queue and the worker, the path being measured; true answers 409 at once
#                 once the event is known sold out)
#   QUEUE_DEMAND_FACTOR  the api's queue-full factor (default 0, off, for the same reason:
#                 hot's stampede asks for more than three times its capacity on purpose)
#   BENCH_ADDR    where the api listens (default 127.0.0.1:8089, beside `make run`'s 8080)
#   BENCH_BINARIES  a directory with other `api` and `worker` binaries to measure (e.g. an
#                 earlier build kept aside, to compare two builds in one session); default
#                 target/release, built here
#   DURABLE       1: restart the local PostgreSQL with the server's default durability
#                 (fsync, synchronous_commit, full_page_writes on) for these runs, and
#                 restart it as it was afterwards
#   TURNSTILE_PG_HA  1: on PostgreSQL as `make ha`'s Patroni cluster (started if need be;
#                 its PostgreSQL column counts the three members and HAProxy)
#
# Every run also reports its cost (CPU per process, statements, rows written and broker
# messages per decided order) and draws a picture (an SVG next to its JSON).
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios="${SCENARIOS:-baseline hot}"
runs="${RUNS:-3}"
fast_path="${FAST_PATH:-false}"
addr="${BENCH_ADDR:-127.0.0.1:8089}"
read -r -a extra <<<"${LOADGEN_ARGS:-}"

log() { echo "[bench] $*"; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
services_were_running=false
services_running && services_were_running=true
bash scripts/services.sh start
durable="${DURABLE:-0}"
if [ "$durable" = 1 ]; then
  bash scripts/services.sh stop postgres
  TURNSTILE_PG_DURABLE=1 bash scripts/services.sh start postgres
fi
# shellcheck disable=SC1090
source "$(bash scripts/services.sh env)"

log "building (release)"
cargo build --release --bins --locked
bin=target/release
sut="${BENCH_BINARIES:-$bin}"

# A database and a virtual host of the benchmark's own, made afresh for every run.
export DATABASE_URL="${DATABASE_URL%/*}/turnstile_bench"
export AMQP_URL="${AMQP_URL%/*}/turnstile_bench"
# Secrets of this benchmark only.
random_secrets
export IMAGE_STORE="$PWD/.local/bench-images"
export METRICS_ADDR=127.0.0.1:0 BIND_ADDR="$addr" SOLD_OUT_FAST_PATH="$fast_path" RUST_LOG="${RUST_LOG:-warn}"
export QUEUE_DEMAND_FACTOR="${QUEUE_DEMAND_FACTOR:-0}"
durable_label=""
if [ "$durable" = 1 ]; then durable_label="durable"; fi
# `TURNSTILE_PG_HA=1 make bench`: on `make ha`'s Patroni cluster (durable, replicated).
if [ "${TURNSTILE_PG_HA:-0}" = 1 ]; then durable_label="patroni, durable, synchronous replication"; fi
label="fast-path-$([ "$fast_path" = true ] && echo on || echo off)${durable_label:+, $durable_label}"

out="bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"

fresh_run() {
  fresh_state turnstile_bench
  "$sut/api" migrate >/dev/null
}

pids=()
api_pid="" worker_pid=""
start_api() {
  "$sut/api" serve & api_pid=$!
  pids+=("$api_pid")
  for _ in $(seq 1 100); do
    curl -fsS "http://$addr/health/ready" >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "[bench] the api did not become ready" >&2
  exit 1
}
start_worker() {
  "$sut/worker" & worker_pid=$!
  pids+=("$worker_pid")
}
stop_processes() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_processes
  if [ "$services_were_running" = false ]; then
    bash scripts/services.sh stop
  elif [ "$durable" = 1 ]; then
    bash scripts/services.sh stop postgres
    bash scripts/services.sh start postgres
  fi
}
trap cleanup EXIT

defaults_for() {
  case "$1" in
    hot | tiers | baseline | ceiling) echo "--events 1 --capacity 2000 --demand 10" ;;
    spread | baseline-spread) echo "--events 10000 --capacity 1 --demand 10" ;;
    rate) echo "--events 1 --capacity 20000 --demand 1 --rate 1000" ;;
    steady) echo "--events 1000 --capacity 20 --demand 1 --rate 1000" ;;
    backlog) echo "--events 1 --capacity 100000 --demand 10" ;;
    prequeue) echo "--events 1 --capacity 2000 --demand 5" ;;
    *) echo "[bench] unknown scenario $1" >&2; exit 2 ;;
  esac
}

for run in $(seq 1 "$runs"); do
  for scenario in $scenarios; do
    log "run $run/$runs: $scenario"
    read -r -a defaults <<<"$(defaults_for "$scenario")"
    fresh_run
    args=(run --out "$out" --label "$label" "${defaults[@]}")
    case "$scenario" in
      baseline | baseline-spread)
        "$bin/loadgen" "${args[@]}" --scenario baseline --label "$durable_label" "${extra[@]}" ;;
      ceiling)
        start_api
        "$bin/loadgen" "${args[@]}" --scenario ceiling --label "" --api "http://$addr" --api-pid "$api_pid" \
          "${extra[@]}" ;;
      backlog)
        start_api
        "$bin/loadgen" "${args[@]}" --scenario backlog --api "http://$addr" --api-pid "$api_pid" \
          --worker "$sut/worker" "${extra[@]}" ;;
      prequeue)
        start_api
        EXPIRY_INTERVAL_MS=100 start_worker
        "$bin/loadgen" "${args[@]}" --scenario prequeue --api "http://$addr" --api-pid "$api_pid" \
          --worker-pid "$worker_pid" "${extra[@]}" ;;
      *)
        start_api
        start_worker
        loadgen_scenario="$scenario"
        [ "$scenario" = steady ] && loadgen_scenario=rate
        "$bin/loadgen" "${args[@]}" --scenario "$loadgen_scenario" --api "http://$addr" --api-pid "$api_pid" \
          --worker-pid "$worker_pid" "${extra[@]}" ;;
    esac
    stop_processes
  done
done

"$bin/loadgen" summary "$out" --markdown "$out/summary.md"
log "results in $out"
