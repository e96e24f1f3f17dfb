#!/usr/bin/env bash
# Local PostgreSQL (15 or newer) + RabbitMQ for development and tests, without Docker or
# systemd.
#
#   scripts/services.sh start    install (apt, as root) if missing (and prometheus, for promtool
#                                and `make observe`), start both, wait until ready,
#                                write the connection URLs to $STATE/env (sourceable)
#   scripts/services.sh stop     stop exactly the processes this script started
#   scripts/services.sh status   say what is running
#   scripts/services.sh env      print the path of the env file
#   scripts/services.sh start|stop postgres|rabbitmq
#                                one service alone (the fault tests restart them)
#   scripts/services.sh kill|start rabbitmq-node NAME
#                                one node of the cluster (by index 0-2 or node name):
#                                `kill` is a kill -9 (a crash), `start` brings it back into
#                                the cluster (the cluster fault tests)
#
# Both run as plain background processes under a project-local state directory
# (default: .local/ in the repository) on non-default ports, so they never clash with
# a system PostgreSQL/RabbitMQ. Ports and the directory can be overridden:
#   TURNSTILE_STATE_DIR, TURNSTILE_PG_PORT (55432), TURNSTILE_AMQP_PORT (56720),
#   TURNSTILE_RABBIT_MGMT_PORT (15680), TURNSTILE_RABBIT_DIST_PORT (25680),
#   TURNSTILE_EPMD_PORT (4380), TURNSTILE_RABBIT_NODE (turnstile@localhost),
#   TURNSTILE_RABBIT_NODES (1, or 3 for a cluster of three nodes on ports + 1 and + 2:
#   `make cluster`; the env file's AMQP_URL then lists all three),
#   TURNSTILE_PG_BIN (PostgreSQL's bin directory; default: the version that made the data
#   directory, else the newest installed under /usr/lib/postgresql, else the distribution's
#   `postgresql` package is installed),
#   TURNSTILE_PG_HA (0, or 1 for PostgreSQL as a Patroni cluster of three members behind
#   HAProxy on TURNSTILE_PG_PORT: `make ha`, see scripts/ha.sh; one of the two runs at a time)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_PORT="${TURNSTILE_PG_PORT:-55432}"
AMQP_PORT="${TURNSTILE_AMQP_PORT:-56720}"
MGMT_PORT="${TURNSTILE_RABBIT_MGMT_PORT:-15680}"
DIST_PORT="${TURNSTILE_RABBIT_DIST_PORT:-25680}"
EPMD_PORT="${TURNSTILE_EPMD_PORT:-4380}"
RABBIT_BIN="/usr/lib/rabbitmq/bin"
APP_USER=turnstile
APP_PASSWORD=turnstile
APP_DB=turnstile
RABBIT_NODE="${TURNSTILE_RABBIT_NODE:-turnstile@localhost}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# PostgreSQL refuses to run as root, so as root it runs as the `postgres` user, which must be
# able to reach the data directory. A checkout under a private home falls back to /tmp.
state_dir() {
  if [ -n "${TURNSTILE_STATE_DIR:-}" ]; then echo "$TURNSTILE_STATE_DIR"; return; fi
  local dir="$REPO/.local"
  if is_root && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$REPO"; then
    dir="/tmp/turnstile-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)"
  fi
  echo "$dir"
}
STATE="$(state_dir)"
PG_DIR="$STATE/postgres"
RABBIT_DIR="$STATE/rabbitmq"
ENV_FILE="$STATE/env"

# PostgreSQL's binaries: those that made the data directory (another major version cannot
# open it), else the newest installed.
find_pg_bin() {
  if [ -n "${TURNSTILE_PG_BIN:-}" ]; then echo "$TURNSTILE_PG_BIN"; return; fi
  if [ -f "$PG_DIR/data/PG_VERSION" ]; then echo "/usr/lib/postgresql/$(cat "$PG_DIR/data/PG_VERSION")/bin"; return; fi
  local newest
  newest="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  echo "${newest:-/usr/lib/postgresql/15/bin}"
}
PG_BIN="$(find_pg_bin)"

as_pg() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

# --- installation -------------------------------------------------------------------------

install_packages() {
  local missing=()
  # The distribution's PostgreSQL (Debian 12: 15; Debian 13: 17; Ubuntu 24.04: 16).
  [ -x "$PG_BIN/initdb" ] || missing+=(postgresql postgresql-client)
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || missing+=(rabbitmq-server)
  # Prometheus: `promtool` checks the metrics in `make test`; `make observe` runs the server.
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_install "${missing[@]}"
  PG_BIN="$(find_pg_bin)"
}

# apt_install PACKAGE...: installs them from the distribution's packages (as root), keeping
# their post-install scripts from starting their default system services. (scripts/ha.sh
# uses it too, through `services.sh apt-install`.)
apt_install() {
  is_root || die "missing packages ($*); run as root or install them: apt-get install $*"
  log "installing $* from Debian packages (once)"
  local policy=/usr/sbin/policy-rc.d backup="" rc=0
  if [ -e "$policy" ]; then backup="$(mktemp)"; cp -p "$policy" "$backup"; fi
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  } >"$STATE/apt.log" 2>&1 || rc=$?
  if [ -n "$backup" ]; then mv "$backup" "$policy"; else rm -f "$policy"; fi
  [ $rc -eq 0 ] || { tail -20 "$STATE/apt.log" >&2; die "apt-get failed (see $STATE/apt.log)"; }
}

# Turnstile needs PostgreSQL 15 or newer.
check_pg_version() {
  local major
  major="$(basename "$(dirname "$PG_BIN")")"
  [ -x "$PG_BIN/initdb" ] || die "no PostgreSQL in $PG_BIN (set TURNSTILE_PG_BIN to its bin directory)"
  if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 15 ]; then
    die "PostgreSQL $major is older than 15; install 15 or newer and set TURNSTILE_PG_BIN"
  fi
}

# --- PostgreSQL ---------------------------------------------------------------------------

PG_HA="${TURNSTILE_PG_HA:-0}"
case "$PG_HA" in 0 | 1) ;; *) die "TURNSTILE_PG_HA must be 0 or 1 (got '$PG_HA')" ;; esac
ha() { bash "$REPO/scripts/ha.sh" "$@"; }

single_pg_running() { [ -f "$PG_DIR/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; }
pg_running() { if [ "$PG_HA" = 1 ]; then ha running; else single_pg_running; fi; }

start_postgres() {
  if [ "$PG_HA" = 1 ]; then
    single_pg_running && die "the single PostgreSQL runs on port $PG_PORT: stop it first (make stop)"
    ha start
    return
  fi
  ha running 2>/dev/null && die "PostgreSQL HA runs on port $PG_PORT: stop it first (make stop)"
  mkdir -p "$PG_DIR/socket"
  is_root && chown postgres:postgres "$PG_DIR" "$PG_DIR/socket"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "initialising PostgreSQL cluster in $PG_DIR/data"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 ||
      { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
  fi
  if pg_running; then
    log "PostgreSQL already running on port $PG_PORT"
  else
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    # fsync off: this cluster holds development and test data only (docker-compose and
    # production use the server defaults); TURNSTILE_PG_DURABLE=1 starts it with the server's
    # defaults instead (`make bench DURABLE=1`). pg_stat_statements shows where database time
    # goes, statements run by triggers included (`CREATE EXTENSION pg_stat_statements` as
    # the superuser, then query the view; `make bench` does).
    local speed="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    if [ "${TURNSTILE_PG_DURABLE:-0}" = 1 ]; then
      speed=""
      log "durable: fsync, synchronous_commit and full_page_writes at the server's defaults"
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -k $PG_DIR/socket -c listen_addresses=127.0.0.1 -c max_connections=400 $speed -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all" \
      start >/dev/null || { tail -20 "$PG_DIR/postgres.log" >&2; die "PostgreSQL did not start"; }
  fi
  for _ in $(seq 1 60); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.5
  done
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL is not ready"
  app_database "postgres://postgres@127.0.0.1:$PG_PORT/postgres" || die "could not create the role and database $APP_DB"
  log "PostgreSQL ready"
}

# app_database SUPERUSER_URL: the app's role and database, made if missing. The role may
# create databases, so that every test gets a fresh one. (scripts/ha.sh uses it too.)
app_database() {
  psql -q "$1" -v ON_ERROR_STOP=1 <<SQL >/dev/null || return 1
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') THEN
    CREATE ROLE $APP_USER LOGIN CREATEDB PASSWORD '$APP_PASSWORD';
  END IF;
END \$\$;
SQL
  if ! psql -tA "$1" -c "SELECT 1 FROM pg_database WHERE datname = '$APP_DB'" | grep -q 1; then
    psql -q "$1" -c "CREATE DATABASE $APP_DB OWNER $APP_USER" >/dev/null || return 1
  fi
}

stop_postgres() {
  # Whichever runs: `make stop` stops what `make services` or `make ha` started.
  ha stop
  if single_pg_running; then
    log "stopping PostgreSQL"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
  fi
}

# --- RabbitMQ -----------------------------------------------------------------------------

# TURNSTILE_RABBIT_NODES=3 (`make cluster`): three nodes of one cluster on this machine. Node
# 0 has the usual name and ports; node i is `<name>-i`, on each port + i, with the same
# Erlang cookie, and joins node 0's cluster. The cluster keeps its state apart
# (rabbitmq-cluster/, rabbitmq-cluster-i/), so the single node never sees a cluster's
# membership (its quorum queues would wait for replicas that never come back); the two use
# the same ports, so one runs at a time.
RABBIT_NODES="${TURNSTILE_RABBIT_NODES:-1}"
case "$RABBIT_NODES" in 1 | 3) ;; *) die "TURNSTILE_RABBIT_NODES must be 1 or 3 (got '$RABBIT_NODES')" ;; esac
SINGLE_RABBIT_DIR="$RABBIT_DIR"
CLUSTER_RABBIT_DIR="$STATE/rabbitmq-cluster"
if [ "$RABBIT_NODES" != 1 ]; then RABBIT_DIR="$CLUSTER_RABBIT_DIR"; fi

node_dir() { if [ "$1" = 0 ]; then echo "$RABBIT_DIR"; else echo "$RABBIT_DIR-$1"; fi; }
node_name() { if [ "$1" = 0 ]; then echo "$RABBIT_NODE"; else echo "${RABBIT_NODE%@*}-$1@${RABBIT_NODE#*@}"; fi; }
node_amqp_port() { echo $((AMQP_PORT + $1)); }
# The nodes that exist: those asked for, and any left running or with state from before.
node_indexes() {
  local i
  for i in $(seq 0 $((RABBIT_NODES - 1))); do echo "$i"; done
}

rabbit_env() {
  local node="${1:-0}" dir
  dir="$(node_dir "$node")"
  export HOME="$dir/home"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME="$(node_name "$node")"
  export RABBITMQ_CONFIG_FILE="$dir/rabbitmq"   # .conf is appended by RabbitMQ
  export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$dir/mnesia"
  export RABBITMQ_LOG_BASE="$dir/log"
  export RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
  export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
  export RABBITMQ_DIST_PORT=$((DIST_PORT + node))
  export ERL_EPMD_PORT="$EPMD_PORT"
  # epmd and the Erlang distribution (node-to-node and CLI tools) on loopback only, like
  # every other port here: by default both listen on every interface.
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  # A failed start writes its crash dump here, not into the working directory.
  export ERL_CRASH_DUMP="$dir/log/erl_crash.dump"
}

# rabbitmqctl_ [-N node] args…: rabbitmqctl against node 0, or the given one.
rabbitmqctl_() {
  local node=0
  if [ "${1:-}" = -N ]; then node="$2"; shift 2; fi
  (rabbit_env "$node"; "$RABBIT_BIN/rabbitmqctl" "$@")
}

rabbit_node_running() {
  local dir
  dir="$(node_dir "$1")"
  [ -f "$dir/rabbitmq.pid" ] && kill -0 "$(cat "$dir/rabbitmq.pid")" 2>/dev/null
}
rabbit_running() { rabbit_node_running 0; }

launch_rabbit_node() {
  local node="$1" dir port mgmt
  dir="$(node_dir "$node")"
  port="$(node_amqp_port "$node")"
  mgmt=$((MGMT_PORT + node))
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  if [ ! -f "$dir/home/.erlang.cookie" ]; then
    if [ "$node" = 0 ]; then
      head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/home/.erlang.cookie"
    else
      # One cluster, one cookie.
      cp "$RABBIT_DIR/home/.erlang.cookie" "$dir/home/.erlang.cookie"
    fi
    chmod 400 "$dir/home/.erlang.cookie"
  fi
  : > "$dir/rabbitmq-env.conf"
  cat > "$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
loopback_users = none
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.6
management.tcp.ip = 127.0.0.1
management.tcp.port = $mgmt
# Message counts refreshed every second (make bench reads them), not every five.
collect_statistics_interval = 1000
# In a cluster, new queues' leaders go to the node with the fewest.
queue_leader_locator = balanced
CONF
  echo '[rabbitmq_management].' > "$dir/enabled_plugins"
  if rabbit_node_running "$node"; then
    log "RabbitMQ $(node_name "$node") already running on port $port"
  else
    log "starting RabbitMQ $(node_name "$node") on 127.0.0.1:$port (management on $mgmt)"
    (rabbit_env "$node"; setsid "$RABBIT_BIN/rabbitmq-server" >"$dir/log/console.log" 2>&1 < /dev/null &)
  fi
}

await_rabbit_node() {
  local node="$1" dir port
  dir="$(node_dir "$node")"
  port="$(node_amqp_port "$node")"
  local i
  for i in $(seq 1 120); do
    if rabbitmqctl_ -N "$node" -q await_startup --timeout 2 >/dev/null 2>&1; then break; fi
    # The pid file appears a moment after launch; a node that is gone after that has failed.
    if [ "$i" -gt 10 ] && ! rabbit_node_running "$node"; then
      tail -30 "$dir/log/console.log" >&2; die "RabbitMQ exited during start"
    fi
    sleep 0.5
  done
  rabbitmqctl_ -N "$node" -q await_startup --timeout 5 >/dev/null 2>&1 || { tail -30 "$dir/log/console.log" >&2; die "RabbitMQ is not ready"; }
  if [ "$node" != 0 ] && ! rabbitmqctl_ -N "$node" -q cluster_status 2>/dev/null | grep -q "$RABBIT_NODE"; then
    log "joining $(node_name "$node") to $RABBIT_NODE's cluster"
    rabbitmqctl_ -N "$node" -q stop_app >/dev/null
    rabbitmqctl_ -N "$node" -q join_cluster "$RABBIT_NODE" >/dev/null
    rabbitmqctl_ -N "$node" -q start_app >/dev/null
  fi
  # Wait for the AMQP listener itself, not only the node.
  for _ in $(seq 1 40); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.25; done
  log "RabbitMQ $(node_name "$node") ready"
}

# The index of a node given by index or by name.
node_index() {
  local node
  for node in $(node_indexes); do
    if [ "$1" = "$node" ] || [ "$1" = "$(node_name "$node")" ]; then echo "$node"; return; fi
  done
  die "no RabbitMQ node '$1' (an index below $RABBIT_NODES or a node name)"
}

# A crash: kill -9 of the node's Erlang VM, nothing shut down cleanly.
kill_rabbit_node() {
  local node dir pid
  node="$(node_index "$1")"
  dir="$(node_dir "$node")"
  rabbit_node_running "$node" || die "RabbitMQ $(node_name "$node") is not running"
  pid="$(cat "$dir/rabbitmq.pid")"
  log "kill -9 RabbitMQ $(node_name "$node") (pid $pid)"
  kill -KILL "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  die "RabbitMQ $(node_name "$node") survived kill -9"
}

start_rabbit_node() {
  local node
  node="$(node_index "$1")"
  launch_rabbit_node "$node"
  await_rabbit_node "$node"
}

rabbitmq_queues_() { (rabbit_env 0; "$RABBIT_BIN/rabbitmq-queues" "$@"); }

start_rabbitmq() {
  local node other
  other="$CLUSTER_RABBIT_DIR"
  [ "$RABBIT_NODES" = 1 ] || other="$SINGLE_RABBIT_DIR"
  if [ -f "$other/rabbitmq.pid" ] && kill -0 "$(cat "$other/rabbitmq.pid")" 2>/dev/null; then
    die "RabbitMQ runs in the other mode (one node / a cluster) on the same ports: make stop (with the same TURNSTILE_RABBIT_NODES) first"
  fi
  # All nodes are launched before any is waited for: after a full stop, each node waits at
  # start for the others that were running when it stopped.
  for node in $(seq 0 $((RABBIT_NODES - 1))); do launch_rabbit_node "$node"; done
  for node in $(seq 0 $((RABBIT_NODES - 1))); do await_rabbit_node "$node"; done
  if [ "$RABBIT_NODES" -gt 1 ]; then
    # Quorum queues declared before the cluster formed get replicas on every node, and the
    # queues' leaders are spread over the nodes.
    for node in $(seq 1 $((RABBIT_NODES - 1))); do
      rabbitmq_queues_ -q grow "$(node_name "$node")" all >/dev/null 2>&1 || log "could not grow the queues onto $(node_name "$node")"
    done
    rabbitmq_queues_ -q rebalance quorum >/dev/null 2>&1 || log "could not rebalance the queues' leaders"
  fi
}

stop_rabbit_node() {
  local node="$1" dir
  dir="$(node_dir "$node")"
  if rabbit_node_running "$node"; then
    log "stopping RabbitMQ $(node_name "$node")"
    local pid
    pid="$(cat "$dir/rabbitmq.pid")"
    rabbitmqctl_ -N "$node" -q shutdown >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    # Until the process is gone its ports are not free for the next start.
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}

# Stops every node this state directory runs, in either mode (the other nodes first: node
# 0 is the one they joined, and the last to stop is the one that may start alone).
stop_rabbitmq() {
  local mode_dir="$RABBIT_DIR" dir node
  for dir in "$CLUSTER_RABBIT_DIR" "$SINGLE_RABBIT_DIR"; do
    RABBIT_DIR="$dir"
    for node in 2 1 0; do stop_rabbit_node "$node"; done
  done
  RABBIT_DIR="$mode_dir"
  # The private epmd (own port) was started by the nodes; stop it too.
  if command -v epmd >/dev/null 2>&1; then
    epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
  fi
}

# --- commands -----------------------------------------------------------------------------

# Every node's AMQP URL, comma-separated (api and worker take the list).
amqp_urls() {
  local node urls=()
  for node in $(node_indexes); do urls+=("amqp://guest:guest@127.0.0.1:$(node_amqp_port "$node")/%2f"); done
  (IFS=,; echo "${urls[*]}")
}

# Every node's management URL, comma-separated (the tests ask any node that answers).
management_urls() {
  local node urls=()
  for node in $(node_indexes); do urls+=("http://guest:guest@127.0.0.1:$((MGMT_PORT + node))"); done
  (IFS=,; echo "${urls[*]}")
}

# The PostgreSQL processes' pid files, for measurements: the server's, or every member's
# and HAProxy's.
pg_pid_files() {
  if [ "$PG_HA" = 1 ]; then
    local ha="$STATE/ha"
    echo "$ha/pg0/data/postmaster.pid,$ha/pg1/data/postmaster.pid,$ha/pg2/data/postmaster.pid,$ha/haproxy.pid"
  else
    echo "$PG_DIR/data/postmaster.pid"
  fi
}

write_env() {
  cat > "$ENV_FILE" <<ENV
# Written by scripts/services.sh: connection URLs of the local services.
export DATABASE_URL=postgres://$APP_USER:$APP_PASSWORD@127.0.0.1:$PG_PORT/$APP_DB
export AMQP_URL=$(amqp_urls)
export RABBITMQ_MANAGEMENT_URL=http://guest:guest@127.0.0.1:$MGMT_PORT
export RABBITMQ_MANAGEMENT_URLS=$(management_urls)
# For measurements (make bench): the services' processes and the database superuser.
export TURNSTILE_PG_PID_FILE=$(pg_pid_files)
export TURNSTILE_RABBIT_PID_FILE=$RABBIT_DIR/rabbitmq.pid
export TURNSTILE_PG_SUPERUSER_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
ENV
}

cmd_start() {
  mkdir -p "$STATE"
  install_packages
  check_pg_version
  local pg_log="$STATE/start-postgres.log"
  # A failed start stops what this call started, so nothing is left running half-way.
  local pg_was_running=false rabbit_was_running=false
  pg_running && pg_was_running=true
  rabbit_running && rabbit_was_running=true
  start_postgres 2>"$pg_log" &
  START_PG_PID=$!
  trap 'undo_failed_start $? '"$pg_was_running $rabbit_was_running" EXIT
  start_rabbitmq
  if ! wait "$START_PG_PID"; then cat "$pg_log" >&2; die "PostgreSQL failed to start"; fi
  trap - EXIT
  cat "$pg_log" >&2
  write_env
  log "services ready; connection URLs in $ENV_FILE"
}

# undo_failed_start STATUS PG_WAS_RUNNING RABBIT_WAS_RUNNING: the EXIT trap of cmd_start.
undo_failed_start() {
  [ "$1" = 0 ] && return
  wait "$START_PG_PID" 2>/dev/null || true
  if [ "$2" = false ] && pg_running; then log "start failed: stopping the PostgreSQL it started"; stop_postgres; fi
  if [ "$3" = false ] && rabbit_running; then log "start failed: stopping the RabbitMQ it started"; stop_rabbitmq; fi
}

cmd_stop() {
  stop_rabbitmq
  stop_postgres
  log "stopped"
}

cmd_status() {
  if ha running 2>/dev/null; then
    echo "postgres: running as a Patroni cluster behind HAProxy on 127.0.0.1:$PG_PORT"
    ha status
  elif single_pg_running; then
    echo "postgres: running on 127.0.0.1:$PG_PORT"
  else
    echo "postgres: stopped"
  fi
  local node
  for node in $(node_indexes); do
    local label=rabbitmq
    [ "$node" = 0 ] || label="rabbitmq $(node_name "$node")"
    if rabbit_node_running "$node"; then
      echo "$label: running on 127.0.0.1:$(node_amqp_port "$node") (management $((MGMT_PORT + node)))"
    else
      echo "$label: stopped"
    fi
  done
  # The api and worker of `make run` (scripts/run.sh records them while it runs).
  local api_pid="" worker_pid="" bind_addr=""
  if [ -f "$STATE/run.pids" ]; then
    # shellcheck disable=SC1091
    source "$STATE/run.pids"
  fi
  if [ -n "$api_pid" ] && kill -0 "$api_pid" 2>/dev/null; then
    local ready
    ready="$(curl -fsS -m 2 -o /dev/null -w '%{http_code}' "http://$bind_addr/health/ready" 2>/dev/null || true)"
    echo "api: running (pid $api_pid) on http://$bind_addr, ready: ${ready:-no answer}"
  else
    echo "api: not running (make run starts it)"
  fi
  if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then
    echo "worker: running (pid $worker_pid)"
  else
    echo "worker: not running (make run starts it)"
  fi
}

# One service alone (the fault tests restart them one at a time): `start postgres`, `stop rabbitmq`.
one_service() {
  case "$2" in
    postgres) "$1_postgres" ;;
    rabbitmq) "$1_rabbitmq" ;;
    *) die "unknown service '$2' (postgres or rabbitmq)" ;;
  esac
}

case "${1:-}:${2:-}" in
  start:) cmd_start ;;
  stop:) cmd_stop ;;
  kill:rabbitmq-node) kill_rabbit_node "${3:?a node index or name}" ;;
  start:rabbitmq-node) mkdir -p "$STATE"; start_rabbit_node "${3:?a node index or name}" ;;
  start:* | stop:*) mkdir -p "$STATE"; one_service "$1" "$2" ;;
  status:) cmd_status ;;
  env:) echo "$ENV_FILE" ;;
  state-dir:) echo "$STATE" ;;
  app-database:*) app_database "${2:?a superuser URL}" ;;
  apt-install:*) mkdir -p "$STATE"; shift; apt_install "$@" ;;
  *) echo "usage: $0 start|stop [postgres|rabbitmq] | kill|start rabbitmq-node NODE | status | env | state-dir | app-database SUPERUSER_URL | apt-install PACKAGE..." >&2; exit 2 ;;
esac
