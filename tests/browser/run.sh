#!/usr/bin/env bash
# Runs the headless-Chromium tests of the demo page (tests/browser/*.test.mjs).
#   tests/browser/run.sh            (from anywhere; runs from the repository root)
# Needs the edge binary: TOKENFAN_EDGE_BIN (default target/debug/tokenfan-edge).
# Installs what is missing first: Debian chromium, and playwright-core via `npm ci`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

chromium_bin="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$chromium_bin" ]; then
  echo "installing chromium (Debian package)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium
fi

if [ ! -d "$here/node_modules/playwright-core" ]; then
  echo "installing playwright-core (npm ci)"
  (cd "$here" && npm ci --no-audit --no-fund)
fi

edge_bin="${TOKENFAN_EDGE_BIN:-target/debug/tokenfan-edge}"
if [ ! -x "$edge_bin" ]; then
  echo "edge binary not found at $edge_bin: build it first (cargo build -p tokenfan-edge) or set TOKENFAN_EDGE_BIN" >&2
  exit 1
fi

exec node --test tests/browser/*.test.mjs
