#!/usr/bin/env bash
# `make lint` (and the first step of `make test`): formatting, clippy with warnings as
# errors, the API docs with warnings as errors (a broken intra-doc link fails), and the
# scripts checked by ShellCheck at severity warning and above (the distribution's
# package, installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[lint] $*"; }

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings -A rustdoc::private-intra-doc-links" cargo doc --workspace --no-deps --document-private-items --locked --quiet

if ! command -v shellcheck >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "[lint] error: shellcheck is missing; install it (apt-get install shellcheck) or run as root once" >&2
    exit 1
  fi
  log "installing the distribution's shellcheck (once)"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck
  } >/dev/null
fi
log "shellcheck scripts/*.sh .ci/run"
shellcheck -x --severity=warning scripts/*.sh .ci/run
