#!/usr/bin/env bash
# The README's recipes, run as a reader would: `make run` in one terminal, then every shell
# block marked `<!-- runnable -->` pasted in order into another (one bash session, so a
# variable set in one block is there in the next), each command stopping the check if it
# fails. Ends with Ctrl-C to `make run`, which must stop cleanly. Part of `make test`.
#   scripts/docs-check.sh [README.md]
set -euo pipefail
cd "$(dirname "$0")/.."

readme="${1:-README.md}"
log() { echo "[docs-check] $*"; }
for tool in curl jq openssl rabbitmqadmin; do
  command -v "$tool" >/dev/null || { echo "[docs-check] error: the README's recipes need $tool" >&2; exit 1; }
done

work="$(mktemp -d)"
run_pid=""
finish() {
  local code=$?
  if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
    kill -INT -- "-$run_pid" 2>/dev/null || true
    wait "$run_pid" 2>/dev/null || true
  fi
  # What the recipes left in the development broker: a consumer's queue nobody reads.
  if [ -f "$work/billing" ]; then
    rabbitmqadmin -P "${TURNSTILE_RABBIT_MGMT_PORT:-15680}" delete queue name=billing >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$code"
}
trap finish EXIT

# The blocks, in order: a fenced block counts when the line before its fence is exactly
# `<!-- runnable -->`.
awk -v out="$work/recipes.sh" '
  /^<!-- runnable -->$/ { marked = 1; next }
  marked && /^```sh$/   { inside = 1; marked = 0; n++; printf "echo \"[docs-check] block %d (README line %d)\"\n", n, NR >> out; next }
  inside && /^```$/     { inside = 0; next }
  inside                { print >> out; next }
  { marked = 0 }
' "$readme"
blocks="$(grep -c '^echo "\[docs-check\] block' "$work/recipes.sh" || true)"
[ "$blocks" -gt 0 ] || { echo "[docs-check] error: no runnable blocks in $readme" >&2; exit 1; }
grep -q 'name=billing' "$work/recipes.sh" && touch "$work/billing"

# Terminal 1: `make run`, with its own defaults (nothing set but what a reader's shell has).
# Job control gives it a process group of its own, so Ctrl-C can be sent to the group as a
# terminal does. SIGINT is reset to its default first: when this check itself runs as a
# background job of a script (CI, `make test &`), it inherits SIGINT ignored, and a signal
# ignored on entry can be neither trapped by bash nor handled by make (only the api and the
# worker, which install their own handler, would stop, and make run would fail).
log "make run (a first build of the release binaries takes a while)"
set -m
env -u BIND_ADDR -u WEBHOOK_ALLOW_NETWORKS -u JWT_SECRET -u WEBHOOK_SECRET -u TICKET_SECRET \
  perl -e '$SIG{INT} = "DEFAULT"; exec @ARGV or die "exec $ARGV[0]: $!\n"' \
  make run > "$work/run.log" 2>&1 &
run_pid=$!
set +m
for _ in $(seq 1 1800); do
  grep -q 'Turnstile is serving' "$work/run.log" && break
  if ! kill -0 "$run_pid" 2>/dev/null; then
    cat "$work/run.log" >&2
    echo "[docs-check] error: make run stopped before serving" >&2
    exit 1
  fi
  sleep 1
done
grep -q 'Turnstile is serving' "$work/run.log" || { tail -50 "$work/run.log" >&2; exit 1; }
log "make run is serving; running $blocks blocks of $readme"

# Terminal 2: the blocks as pasted, with nothing from this script's environment but what
# finds the tools (PATH, HOME, Rust's own homes).
reader_env=(PATH="$PATH" HOME="$HOME" TERM=dumb)
for name in CARGO_HOME RUSTUP_HOME RUSTUP_TOOLCHAIN; do
  [ -n "${!name:-}" ] && reader_env+=("$name=${!name}")
done
if ! env -i "${reader_env[@]}" bash -euo pipefail "$work/recipes.sh" < /dev/null; then
  echo "[docs-check] error: a recipe failed (above); make run's output:" >&2
  tail -30 "$work/run.log" >&2
  exit 1
fi

# Ctrl-C in terminal 1.
kill -INT -- "-$run_pid"
status=0
wait "$run_pid" || status=$?
run_pid=""
if [ "$status" != 130 ]; then
  tail -30 "$work/run.log" >&2
  echo "[docs-check] error: make run exited with $status after Ctrl-C (expected 130)" >&2
  exit 1
fi
log "all $blocks blocks ran; make run stopped on Ctrl-C"
