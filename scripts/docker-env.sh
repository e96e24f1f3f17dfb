#!/usr/bin/env bash
# `make docker-env`: the secrets docker-compose.yml needs, generated once into .env (which
# compose reads), so every `docker compose up` reuses them: access tokens, ticket codes and
# the payment provider's key survive restarts. A secret already in .env is kept; one
# missing is added. Back .env up with the database: losing it logs everyone out, voids
# every ticket code issued and changes the key the payment provider signs with.
set -euo pipefail
cd "$(dirname "$0")/.."

env_file="${1:-.env}"
umask 077
touch "$env_file"
added=()
add() {
  if ! grep -q "^$1=" "$env_file"; then
    echo "$1=$2" >> "$env_file"
    added+=("$1")
  fi
}
add JWT_SECRET "$(head -c 48 /dev/urandom | base64 -w0)"
# Standard Webhooks form: give the same value to the payment provider.
add WEBHOOK_SECRET "whsec_$(head -c 32 /dev/urandom | base64 -w0)"
add TICKET_SECRET "$(head -c 48 /dev/urandom | base64 -w0)"
# The RabbitMQ nodes' shared secret (the cluster profile's nodes authenticate with it).
add RABBITMQ_ERLANG_COOKIE "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
if [ "${#added[@]}" -gt 0 ]; then
  echo "[docker-env] generated ${added[*]} into $env_file (mode 600); keep it, and back it up"
else
  echo "[docker-env] $env_file already has every secret; nothing changed"
fi
