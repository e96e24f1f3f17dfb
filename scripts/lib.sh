# Helpers sourced by the scripts that start their own api and worker (run, bench, fuzz).
# shellcheck shell=bash

# True when both services are already running (so the caller leaves them running).
services_running() {
  # Read whole first: `grep -q` closing the pipe early would fail a pipeline under pipefail.
  local status
  status="$(bash scripts/services.sh status)"
  grep -q 'postgres: running' <<<"$status" && grep -q 'rabbitmq: running' <<<"$status"
}

# fresh_state NAME: an empty database NAME beside the services' own, and an empty RabbitMQ
# virtual host NAME the services' user may use. Needs the services' env file sourced.
fresh_state() {
  local name="$1" user="${RABBITMQ_MANAGEMENT_URL#*://}"
  user="${user%%:*}"
  psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" \
    -c "CREATE DATABASE $name" >/dev/null
  curl -fsS -o /dev/null -X DELETE "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$name" 2>/dev/null || true
  curl -fsS -o /dev/null -X PUT "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$name"
  curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$RABBITMQ_MANAGEMENT_URL/api/permissions/$name/$user"
}

# drop_state NAME: removes what fresh_state made.
drop_state() {
  psql -q "${DATABASE_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true
  curl -fsS -o /dev/null -X DELETE "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$1" 2>/dev/null || true
}

# Exports JWT_SECRET, WEBHOOK_SECRET and TICKET_SECRET, random, for this process only.
random_secrets() {
  JWT_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
  WEBHOOK_SECRET="whsec_$(head -c 32 /dev/urandom | base64 -w0)"
  TICKET_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
  export JWT_SECRET WEBHOOK_SECRET TICKET_SECRET
}
