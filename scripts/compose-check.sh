#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine, as part of `make test`:
#   1. against the Compose Specification's JSON schema (check-jsonschema's vendored copy,
#      from PyPI into a venv of its own in the state directory);
#   2. with a Compose implementation's own `config` (interpolation, anchors, references
#      between services): `docker compose` when the plugin is installed, otherwise the
#      distribution's `docker-compose` package (installed with apt-get when missing);
#   3. the observability profile (Prometheus, Grafana, the dashboard JSON);
#   4. that without the secrets compose refuses to start and says to run `make docker-env`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[compose-check] $*"; }
state="${TURNSTILE_STATE_DIR:-$PWD/.local}"
venv="$state/venv-compose-check"
if [ ! -x "$venv/bin/check-jsonschema" ]; then
  log "installing check-jsonschema into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'check-jsonschema>=0.33,<1'
fi
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if ! command -v docker-compose >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "[compose-check] error: no 'docker compose' or 'docker-compose'; install one (or run as root once)" >&2
      exit 1
    fi
    log "installing the distribution's docker-compose (for 'config' only; no engine needed)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  fi
  compose=(docker-compose)
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# The secrets `make docker-env` would write, into a file of their own (not the checkout's .env).
bash scripts/docker-env.sh "$scratch/env" >/dev/null
"${compose[@]}" --project-directory . --env-file "$scratch/env" -f docker-compose.yml config -q
log "${compose[*]} config: valid"
# The observability profile (Prometheus + Grafana) and the files it mounts.
"${compose[@]}" --project-directory . --env-file "$scratch/env" -f docker-compose.yml --profile observability config \
  > "$scratch/observability.yml"
for service in prometheus grafana; do
  grep -q "^  $service:" "$scratch/observability.yml" || { echo "[compose-check] error: no $service in the observability profile" >&2; exit 1; }
done
jq -e '.uid == "turnstile" and (.panels | length > 0)' deploy/grafana/dashboards/turnstile.json > /dev/null
log "${compose[*]} --profile observability config: valid (prometheus, grafana; the dashboard JSON loads)"
# The cluster profile: three RabbitMQ nodes, one cookie, the peer discovery file they mount.
"${compose[@]}" --project-directory . --env-file "$scratch/env" -f docker-compose.yml --profile cluster config \
  > "$scratch/cluster.yml"
for service in rabbitmq rabbitmq-2 rabbitmq-3; do
  grep -q "^  $service:" "$scratch/cluster.yml" || { echo "[compose-check] error: no $service in the cluster profile" >&2; exit 1; }
done
[ "$(grep -c 'RABBITMQ_ERLANG_COOKIE' "$scratch/cluster.yml")" = 3 ] || { echo "[compose-check] error: the cluster's nodes do not all get the cookie" >&2; exit 1; }
grep -q 'cluster_formation.classic_config.nodes.3 = rabbit@rabbitmq-3' deploy/rabbitmq/cluster.conf
log "${compose[*]} --profile cluster config: valid (rabbitmq, rabbitmq-2, rabbitmq-3 with one cookie)"

: > "$scratch/empty"
if env -u JWT_SECRET -u WEBHOOK_SECRET -u TICKET_SECRET \
    "${compose[@]}" --project-directory . --env-file "$scratch/empty" -f docker-compose.yml config -q \
    > "$scratch/out" 2>&1; then
  echo "[compose-check] error: compose accepted a configuration without secrets" >&2
  exit 1
fi
grep -q 'make docker-env' "$scratch/out" || { cat "$scratch/out" >&2; exit 1; }
log "without secrets it refuses and names 'make docker-env'"
