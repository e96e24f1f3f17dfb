#!/usr/bin/env bash
# PostgreSQL as a highly available cluster on this machine, without Docker or systemd:
# three Patroni members (PostgreSQL 15, synchronous replication), one etcd for Patroni's
# configuration store, and HAProxy on one port that sends sessions to the member whose
# Patroni REST API answers `GET /primary` 200 (the leader) and cuts them when it stops.
# `scripts/services.sh` runs it in place of the single PostgreSQL when TURNSTILE_PG_HA=1
# (`make ha`); the fault suite drives it directly.
#
#   scripts/ha.sh start            install if missing (etcd and HAProxy from Debian's packages,
#                                  Patroni from PyPI into a virtualenv), start everything,
#                                  wait for a leader and a synchronous standby, create the
#                                  app's role and database
#   scripts/ha.sh stop             stop what this script started
#   scripts/ha.sh running          exit 0 when HAProxy and a leader answer
#   scripts/ha.sh status           the members, as `patronictl list` shows them
#   scripts/ha.sh cluster          the members as JSON (Patroni's `GET /cluster`)
#   scripts/ha.sh pids MEMBER      "PATRONI_PID POSTMASTER_PID" of member pg0, pg1 or pg2
#   scripts/ha.sh start-member MEMBER
#                                  start a member's Patroni again (after a kill): it rejoins
#                                  as a replica (rewound with pg_rewind if it diverged)
#   scripts/ha.sh patronictl ARGS  patronictl with this cluster's configuration, e.g.
#                                  `switchover --force`
#
# Ports (TURNSTILE_PG_PORT is HAProxy's, the one clients use):
#   TURNSTILE_PG_PORT (55432), members on TURNSTILE_PG_PORT + 10 + i, their REST APIs on
#   TURNSTILE_PG_PORT + 20 + i, etcd's client port TURNSTILE_PG_PORT + 30 (peer + 31).
# Replication: TURNSTILE_PG_HA_SYNC=quorum (default: `synchronous_mode: quorum`, strict, one
#   synchronous standby: a commit is acknowledged once one of the two standbys has it) or
#   off (asynchronous: the documented mode in which the fault suite's checker may find
#   lost orders).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_PORT="${TURNSTILE_PG_PORT:-55432}"
MEMBER_BASE=$((PG_PORT + 10))
REST_BASE=$((PG_PORT + 20))
ETCD_PORT=$((PG_PORT + 30))
SYNC="${TURNSTILE_PG_HA_SYNC:-quorum}"
case "$SYNC" in quorum | off) ;; *) echo "TURNSTILE_PG_HA_SYNC must be quorum or off" >&2; exit 2 ;; esac
MEMBERS=(pg0 pg1 pg2)
SCOPE=turnstile
PATRONI_VERSION=4.1.5

log() { printf '[ha] %s\n' "$*" >&2; }
die() { printf '[ha] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
as_pg() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

STATE="$(bash "$REPO/scripts/services.sh" state-dir)"
HA="$STATE/ha"
VENV="$STATE/patroni-venv"
PG_BIN="${TURNSTILE_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"

member_index() { echo "${1#pg}"; }
member_port() { echo $((MEMBER_BASE + $(member_index "$1"))); }
rest_port() { echo $((REST_BASE + $(member_index "$1"))); }

# --- installation -------------------------------------------------------------------------

install() {
  local missing=()
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  # Patroni runs as the postgres user, so its virtualenv is made with the distribution's
  # Python (a Python under root's home is not readable by it).
  /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    bash "$REPO/scripts/services.sh" apt-install "${missing[@]}"
  fi
  if ! "$VENV/bin/patroni" --version 2>/dev/null | grep -q "$PATRONI_VERSION"; then
    log "installing Patroni $PATRONI_VERSION from PyPI into $VENV (once)"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "patroni[etcd3]==$PATRONI_VERSION" 'psycopg2-binary==2.9.*' \
      >"$STATE/pip-patroni.log" 2>&1 || { tail -20 "$STATE/pip-patroni.log" >&2; die "pip install failed"; }
    chmod -R a+rX "$VENV"
  fi
}

# --- etcd ---------------------------------------------------------------------------------

etcd_running() { [ -f "$HA/etcd.pid" ] && kill -0 "$(cat "$HA/etcd.pid")" 2>/dev/null; }

start_etcd() {
  etcd_running && return 0
  mkdir -p "$HA/etcd"
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  local client="http://127.0.0.1:$ETCD_PORT" peer="http://127.0.0.1:$((ETCD_PORT + 1))"
  nohup etcd --name "$SCOPE" --data-dir "$HA/etcd/data" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$SCOPE=$peer" --initial-cluster-state new \
    --log-level warn >"$HA/etcd/etcd.log" 2>&1 &
  echo $! > "$HA/etcd.pid"
  for _ in $(seq 1 60); do
    curl -fsS -m 1 "$client/health" 2>/dev/null | grep -q '"health":"true"' && return 0
    sleep 0.5
  done
  tail -20 "$HA/etcd/etcd.log" >&2
  die "etcd did not start"
}

# --- Patroni members ----------------------------------------------------------------------

# The configuration of one member. The cluster-wide part (`bootstrap.dcs`) is written to
# etcd by the member that initialises the cluster; later edits go through patronictl.
write_member_config() {
  local name="$1" port rest dir sync_mode=quorum strict=true
  port="$(member_port "$name")"
  rest="$(rest_port "$name")"
  dir="$HA/$name"
  if [ "$SYNC" = off ]; then sync_mode=false; strict=false; fi
  mkdir -p "$dir/socket"
  is_root && chown -R postgres:postgres "$dir"
  cat > "$dir/patroni.yml" <<YAML
scope: $SCOPE
name: $name
log:
  level: INFO
  dir: $dir
restapi:
  listen: 127.0.0.1:$rest
  connect_address: 127.0.0.1:$rest
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT
bootstrap:
  dcs:
    # A leader that cannot renew its key for ttl seconds (20: Patroni's least) is
    # replaced; loop_wait + 2 * retry_timeout <= ttl.
    ttl: 20
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: $sync_mode
    synchronous_mode_strict: $strict
    synchronous_node_count: 1
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 400
        wal_log_hints: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        hot_standby: 'on'
        shared_preload_libraries: pg_stat_statements
        pg_stat_statements.track: all
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:$port
  connect_address: 127.0.0.1:$port
  data_dir: $dir/data
  bin_dir: $PG_BIN
  pgpass: $dir/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: replicator
      password: replicator
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: $dir/socket
watchdog:
  mode: 'off'
YAML
  is_root && chown postgres:postgres "$dir/patroni.yml"
}

patroni_running() { [ -f "$HA/$1/patroni.pid" ] && kill -0 "$(cat "$HA/$1/patroni.pid")" 2>/dev/null; }

start_member() {
  local name="$1"
  patroni_running "$name" && return 0
  write_member_config "$name"
  log "starting Patroni member $name (PostgreSQL 127.0.0.1:$(member_port "$name"), REST $(rest_port "$name"))"
  # shellcheck disable=SC2016
  as_pg bash -c 'nohup "$0" "$1" >>"$2" 2>&1 & echo $!' "$VENV/bin/patroni" "$HA/$name/patroni.yml" \
    "$HA/$name/patroni.out" > "$HA/$name/patroni.pid"
}

# The members, as Patroni's REST API reports them (`/cluster` of any member that answers).
cluster_json() {
  local name
  for name in "${MEMBERS[@]}"; do
    curl -fsS -m 1 "http://127.0.0.1:$(rest_port "$name")/cluster" 2>/dev/null && return 0
  done
  return 1
}

# Waits until a leader runs and (with synchronous replication) a synchronous standby streams.
await_healthy() {
  local want='"role": *"leader"'
  for _ in $(seq 1 240); do
    local cluster
    cluster="$(cluster_json || true)"
    if grep -Eq "$want" <<<"$cluster"; then
      if [ "$SYNC" = off ] || grep -Eq '"role": *"(sync|quorum)_standby"' <<<"$cluster"; then
        return 0
      fi
    fi
    sleep 0.5
  done
  cluster_json >&2 || true
  die "no leader with a synchronous standby after 120 s (logs: $HA/pg*/patroni.out)"
}

# --- HAProxy ------------------------------------------------------------------------------

haproxy_running() { [ -f "$HA/haproxy.pid" ] && kill -0 "$(head -n 1 "$HA/haproxy.pid")" 2>/dev/null; }

start_haproxy() {
  haproxy_running && return 0
  local servers="" name
  for name in "${MEMBERS[@]}"; do
    servers+="  server $name 127.0.0.1:$(member_port "$name") maxconn 400 check port $(rest_port "$name")"$'\n'
  done
  cat > "$HA/haproxy.cfg" <<CFG
# Written by scripts/ha.sh. Sessions go to the member whose Patroni answers GET /primary 200
# (the leader); a member marked down has its sessions cut, so no client keeps writing to a
# demoted or stopped node.
global
  maxconn 2000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30m
  timeout server 30m
  timeout check 1s
listen postgres
  bind 127.0.0.1:$PG_PORT
  option httpchk GET /primary
  http-check expect status 200
  default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
$servers
CFG
  log "starting HAProxy on 127.0.0.1:$PG_PORT"
  haproxy -f "$HA/haproxy.cfg" -D -p "$HA/haproxy.pid" >"$HA/haproxy.log" 2>&1 || { cat "$HA/haproxy.log" >&2; die "HAProxy did not start"; }
}

# --- commands -----------------------------------------------------------------------------

# The app's role and database, through HAProxy (whose checks may take a moment to find
# the leader after a start).
create_app_database() {
  local url="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  for _ in $(seq 1 60); do
    if bash "$REPO/scripts/services.sh" app-database "$url" 2>"$HA/create-db.log"; then return 0; fi
    sleep 1
  done
  cat "$HA/create-db.log" >&2
  die "could not create the app's role and database through HAProxy"
}

cmd_start() {
  mkdir -p "$HA"
  is_root && chown postgres:postgres "$HA"
  install
  start_etcd
  local name
  for name in "${MEMBERS[@]}"; do start_member "$name"; done
  await_healthy
  start_haproxy
  create_app_database
  log "PostgreSQL HA ready: HAProxy 127.0.0.1:$PG_PORT ($SYNC replication)"
}

stop_pidfile() {
  local file="$1" pid
  [ -f "$file" ] || return 0
  pid="$(head -n 1 "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

cmd_stop() {
  [ -d "$HA" ] || return 0
  stop_pidfile "$HA/haproxy.pid"
  local name
  # Patroni stops its PostgreSQL when it stops; a postmaster left by a killed Patroni is
  # stopped directly.
  for name in "${MEMBERS[@]}"; do stop_pidfile "$HA/$name/patroni.pid"; done
  for name in "${MEMBERS[@]}"; do
    if [ -f "$HA/$name/data/postmaster.pid" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$HA/$name/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
  done
  stop_pidfile "$HA/etcd.pid"
  log "PostgreSQL HA stopped"
}

cmd_running() { haproxy_running && cluster_json 2>/dev/null | grep -Eq '"role": *"leader"'; }

cmd_pids() {
  local name="${1:?a member: pg0, pg1 or pg2}" patroni="" postmaster=""
  [ -f "$HA/$name/patroni.pid" ] && patroni="$(cat "$HA/$name/patroni.pid")"
  [ -f "$HA/$name/data/postmaster.pid" ] && postmaster="$(head -n 1 "$HA/$name/data/postmaster.pid")"
  echo "${patroni:--} ${postmaster:--}"
}

patronictl_() { as_pg "$VENV/bin/patronictl" -c "$HA/pg0/patroni.yml" "$@"; }

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  running) cmd_running ;;
  status) if cmd_running; then patronictl_ list; else echo "postgres (HA): not running"; fi ;;
  cluster) cluster_json ;;
  pids) cmd_pids "${2:-}" ;;
  start-member) start_member "${2:?a member: pg0, pg1 or pg2}" ;;
  patronictl) shift; patronictl_ "$@" ;;
  *) echo "usage: $0 start|stop|running|status|cluster|pids MEMBER|start-member MEMBER|patronictl ARGS" >&2; exit 2 ;;
esac
