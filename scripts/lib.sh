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
# The database is dropped as the superuser where there is one: `WITH (FORCE)` must end
# every session on it, and the database's owner may not end another role's (such as a
# superuser's still reading statistics); it is then made by the services' user, its owner.
fresh_state() {
  local name="$1" user="${RABBITMQ_MANAGEMENT_URL#*://}"
  user="${user%%:*}"
  drop_database "$name"
  psql -q -v ON_ERROR_STOP=1 "${DATABASE_URL%/*}/postgres" -c "CREATE DATABASE $name" >/dev/null
  curl -fsS -o /dev/null -X DELETE "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$name" 2>/dev/null || true
  curl -fsS -o /dev/null -X PUT "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$name"
  curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"configure":".*","write":".*","read":".*"}' "$RABBITMQ_MANAGEMENT_URL/api/permissions/$name/$user"
}

# drop_database NAME: drops it, ending every session on it (as the superuser, if known).
drop_database() {
  PGOPTIONS='-c client_min_messages=warning' psql -q -v ON_ERROR_STOP=1 \
    "${TURNSTILE_PG_SUPERUSER_URL:-${DATABASE_URL%/*}/postgres}" -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
}

# drop_state NAME: removes what fresh_state made.
drop_state() {
  drop_database "$1" 2>/dev/null || true
  curl -fsS -o /dev/null -X DELETE "$RABBITMQ_MANAGEMENT_URL/api/vhosts/$1" 2>/dev/null || true
}

# Exports JWT_SECRET, WEBHOOK_SECRET and TICKET_SECRET, random, for this process only.
random_secrets() {
  JWT_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
  WEBHOOK_SECRET="whsec_$(head -c 32 /dev/urandom | base64 -w0)"
  TICKET_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
  export JWT_SECRET WEBHOOK_SECRET TICKET_SECRET
}
