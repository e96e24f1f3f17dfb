#!/usr/bin/env bash
# `make fuzz`: schemathesis (from PyPI, into .local/venv) against the OpenAPI document the
# api serves, with an admin's token: every response must be no 5xx and must match the
# document (status code, content type, headers, body schema).
#
# Starts the services, a fresh database `turnstile_fuzz` and RabbitMQ virtual host of the same name, an
# api and a worker (release build, secrets of this run only) with an event to buy from,
# runs schemathesis and stops what it started. Requests may take up to 40 s: the order
# long-poll (`GET /orders/{id}?wait=N`) legitimately waits up to 30 s.
#
# Settings: FUZZ_EXAMPLES  examples per operation in the fuzzing phase (default 100)
#           FUZZ_ADDR      where the api listens (default 127.0.0.1:8091)
#           FUZZ_ARGS      more `schemathesis run` arguments
set -euo pipefail
cd "$(dirname "$0")/.."

addr="${FUZZ_ADDR:-127.0.0.1:8091}"
log() { echo "[fuzz] $*"; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
services_were_running=false
services_running && services_were_running=true
bash scripts/services.sh start
state="$(dirname "$(bash scripts/services.sh env)")"
# shellcheck disable=SC1090
source "$state/env"

venv="$state/venv"
if [ ! -x "$venv/bin/schemathesis" ]; then
  log "installing schemathesis into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5'
fi

log "building (release)"
cargo build --release --bins --locked
bin=target/release

# The services' own URLs, to make and drop this run's database and virtual host.
fresh_state turnstile_fuzz
export DATABASE_URL="${DATABASE_URL%/*}/turnstile_fuzz" AMQP_URL="${AMQP_URL%/*}/turnstile_fuzz"
random_secrets
export METRICS_ADDR=127.0.0.1:0 IMAGE_STORE="$state/fuzz-images" BIND_ADDR="$addr" RUST_LOG="${RUST_LOG:-warn}"
# Fuzzing logs in and signs up far more often than people do.
export LOGIN_ATTEMPTS_PER_MINUTE=10000 LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE=100000 SIGNUP_PER_MINUTE=100000

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  drop_state turnstile_fuzz
  if [ "$services_were_running" = false ]; then bash scripts/services.sh stop; fi
}
trap cleanup EXIT

"$bin/api" migrate >/dev/null
"$bin/worker" & pids+=($!)
"$bin/api" serve & pids+=($!)
for _ in $(seq 1 100); do curl -fsS "http://$addr/health/ready" >/dev/null 2>&1 && break; sleep 0.2; done

password="fuzz-$(head -c 12 /dev/urandom | base64 -w0)"
"$bin/api" create-admin --email fuzz-admin@example.com --name Fuzz --password "$password" >/dev/null
token="$(curl -fsS -H 'content-type: application/json' \
  -d "{\"email\":\"fuzz-admin@example.com\",\"password\":\"$password\"}" "http://$addr/api/v1/login" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
curl -fsS -o /dev/null -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"name":"Fuzz Fest","location":"Here","organization":"Fuzz","rating":"all-ages","date":"2099-01-01T20:00:00Z","capacity":1000,"price":"10.00","max_per_order":4}' \
  "http://$addr/api/v1/events"

log "schemathesis against http://$addr/api/v1/openapi.json"
read -r -a extra <<<"${FUZZ_ARGS:-}"
"$venv/bin/schemathesis" run "http://$addr/api/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing --max-examples "${FUZZ_EXAMPLES:-100}" --workers 2 \
  --request-timeout 40 \
  --suppress-health-check all --warnings off "${extra[@]}"
