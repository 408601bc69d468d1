#!/usr/bin/env bash
# Third-party clients against a real tokenfan-edge:
#   - test_openai_sdk.py       the official `openai` Python SDK (sync + async), httpx + httpx-sse
#   - test_auth.py             the SDK's api_key and error classes, and stream tickets, against an
#                              edge of its own with --auth api-keys
#   - eventsource.test.mjs     the npm `eventsource` package (reconnect, Last-Event-ID, 204)
#
#   tests/clients/run.sh            (from anywhere; works from the repository root)
#
# Needs the edge binary: TOKENFAN_EDGE_BIN (default target/debug/tokenfan-edge, relative to the
# repository root); build it first (cargo build -p tokenfan-edge).
# Installs what is missing first: python3-venv / nodejs / npm (Debian) when absent, the pinned
# Python packages (requirements.txt) into tests/clients/.venv, and the npm packages (`npm ci`).
# Starts one edge on 127.0.0.1:0, runs both suites against it, always stops it, and ends with
# the line "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing (Debian): $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$@"
}

# ------------------------------------------------------------------ Python venv
venv="$here/.venv"
py_stamp="$venv/.tokenfan-requirements"
if ! command -v python3 >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi
# The venv is rebuilt when requirements.txt or the Python version changes.
want_stamp="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$py_stamp" 2>/dev/null)" != "$want_stamp" ]; then
  echo "creating $venv (pip install -r requirements.txt)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want_stamp" >"$py_stamp"
fi

# ------------------------------------------------------------------ Node packages
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
if [ ! -f "$here/node_modules/eventsource/package.json" ] \
  || [ "$here/package-lock.json" -nt "$here/node_modules/.package-lock.json" ]; then
  echo "installing eventsource (npm ci)"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

# ------------------------------------------------------------------ the edge
edge_bin="${TOKENFAN_EDGE_BIN:-target/debug/tokenfan-edge}"
if [ ! -x "$edge_bin" ]; then
  echo "edge binary not found at $edge_bin: build it first (cargo build -p tokenfan-edge) or set TOKENFAN_EDGE_BIN" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

work="$(mktemp -d)"
edge_pid=""
stop_edge() {
  if [ -n "$edge_pid" ] && kill -0 "$edge_pid" 2>/dev/null; then
    kill -TERM "$edge_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$edge_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$edge_pid" 2>/dev/null || true
    wait "$edge_pid" 2>/dev/null || true
  fi
  edge_pid=""
}
cleanup() {
  stop_edge
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$edge_bin" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json >/dev/null 2>"$work/edge.log" &
edge_pid=$!

# Waits for the "listening" log line, then for /readyz 200 on the admin listener (the embedded
# generator is up).
if ! edge_url="$("$venv/bin/python" - "$work/edge.log" "$edge_pid" <<'PY'
import json, os, sys, time, urllib.request
log, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
addr = None
while addr is None:
    if time.monotonic() > deadline:
        sys.exit("edge did not log 'tokenfan-edge listening' within 30 s")
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("edge exited before listening")
    with open(log) as f:
        for line in f:
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == "tokenfan-edge listening":
                addr = fields["addr"]
                admin = fields["admin_addr"]
                break
    if addr is None:
        time.sleep(0.05)
url = f"http://{addr}"
while True:
    try:
        with urllib.request.urlopen(f"http://{admin}/readyz", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("edge /readyz did not answer 200 within 30 s")
    time.sleep(0.05)
print(url)
PY
)"; then
  echo "--- edge log (last lines) ---" >&2
  tail -n 30 "$work/edge.log" >&2 || true
  echo "0 passed, 1 failed"
  exit 1
fi
echo "tokenfan-edge at $edge_url"
export TOKENFAN_EDGE_URL="$edge_url"

# ------------------------------------------------------------------ the suites
py_rc=0
echo "=== openai SDK / httpx-sse (pytest) ==="
"$venv/bin/python" -m pytest "$here" -q -p no:cacheprovider \
  --junitxml="$work/pytest.xml" || py_rc=$?

node_rc=0
echo "=== npm eventsource (node --test) ==="
node --test --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$work/node.tap" \
  "$here/eventsource.test.mjs" || node_rc=$?

stop_edge

# ------------------------------------------------------------------ summary
read -r py_pass py_fail < <("$venv/bin/python" - "$work/pytest.xml" "$py_rc" <<'PY'
import sys, xml.etree.ElementTree as ET
path, rc = sys.argv[1], int(sys.argv[2])
try:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    passed = total - bad - skipped
    if rc != 0 and bad == 0:
        bad = 1  # the run failed without a failing test (collection, crash)
    if total == 0:
        bad = max(bad, 1)  # running no test is a failure here
    print(passed, bad)
except (OSError, ET.ParseError):
    print(0, 1)
PY
)

node_pass=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$work/node.tap" 2>/dev/null | tail -n1)
node_fail=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$work/node.tap" 2>/dev/null | tail -n1)
node_cancelled=$(sed -n 's/^# cancelled \([0-9]*\)$/\1/p' "$work/node.tap" 2>/dev/null | tail -n1)
node_pass=${node_pass:-0}
node_fail=$(( ${node_fail:-1} + ${node_cancelled:-0} ))
if [ "$node_rc" -ne 0 ] && [ "$node_fail" -eq 0 ]; then node_fail=1; fi
if [ "$node_pass" -eq 0 ] && [ "$node_fail" -eq 0 ]; then node_fail=1; fi

passed=$(( py_pass + node_pass ))
failed=$(( py_fail + node_fail ))
echo "clients: pytest $py_pass passed, $py_fail failed; node $node_pass passed, $node_fail failed"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
