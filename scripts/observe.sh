#!/usr/bin/env bash
# `make observe`: Prometheus (the distribution's `prometheus` package, which
# scripts/services.sh installs) scraping the api and the worker of `make run` on this machine,
# with the alert rules of deploy/prometheus/alerts.yml, on http://127.0.0.1:19090 until
# Ctrl-C. Its data stays under the state directory.
#   scripts/observe.sh          run until Ctrl-C
#   scripts/observe.sh --check  start, wait until both targets are scraped and up, stop
# Addresses: TURNSTILE_API_METRICS_ADDR (127.0.0.1:9464), TURNSTILE_WORKER_METRICS_ADDR
# (127.0.0.1:9465), as scripts/run.sh uses them; TURNSTILE_PROMETHEUS_PORT (19090).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[observe] $*"; }
command -v prometheus >/dev/null && command -v promtool >/dev/null || {
  echo "[observe] error: no prometheus/promtool; run 'make services' once as root (it installs the package)" >&2
  exit 1
}
state="${TURNSTILE_STATE_DIR:-$PWD/.local}/prometheus"
api="${TURNSTILE_API_METRICS_ADDR:-127.0.0.1:9464}"
worker="${TURNSTILE_WORKER_METRICS_ADDR:-127.0.0.1:9465}"
listen="127.0.0.1:${TURNSTILE_PROMETHEUS_PORT:-19090}"
mkdir -p "$state/data"
cat > "$state/prometheus.yml" <<YAML
# Written by scripts/observe.sh: make run's api and worker on this machine.
global:
  scrape_interval: 5s
  evaluation_interval: 15s
rule_files:
  - $PWD/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: turnstile-api
    static_configs: [{targets: ["$api"]}]
  - job_name: turnstile-worker
    static_configs: [{targets: ["$worker"]}]
YAML
promtool check config "$state/prometheus.yml" >/dev/null
args=(--config.file="$state/prometheus.yml" --storage.tsdb.path="$state/data" --web.listen-address="$listen")

if [ "${1:-}" != --check ]; then
  log "Prometheus on http://$listen scraping the api ($api) and the worker ($worker); Ctrl-C stops it"
  log "dashboard: import deploy/grafana/dashboards/turnstile.json into a Grafana with this Prometheus as data source"
  exec prometheus "${args[@]}" --log.level=warn
fi

prometheus "${args[@]}" --log.level=warn > "$state/check.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  up="$(curl -fsS "http://$listen/api/v1/query?query=up" 2>/dev/null | jq -r '[.data.result[] | select(.value[1] == "1") | .metric.job] | sort | join(",")' || true)"
  if [ "$up" = "turnstile-api,turnstile-worker" ]; then
    log "Prometheus scrapes both: $up"
    exit 0
  fi
  sleep 1
done
echo "[observe] error: Prometheus did not see both targets up (last: '${up:-none}')" >&2
tail -20 "$state/check.log" >&2
exit 1
