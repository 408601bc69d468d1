#!/usr/bin/env bash
# Edge benchmarks (not tests): the delay the edge adds at STREAMS concurrent streams at
# 50 tokens/s (POST-SSE and WebSocket), and the edge's resident memory per idle SSE / WebSocket
# connection at IDLE_CONNECTIONS connections. One embedded edge (mock generator in the same
# process) pinned to one core, the load generator (tokenfan-loadgen) pinned to the other;
# loopback only. A fresh edge is started for every run, so each measures from a clean baseline.
# See docs/benchmarks.md for what the numbers mean and the last recorded results.
#
# Every parameter can be overridden from the environment, e.g.
#   RUNS="stream-sse idle-sse" STREAMS=500 scripts/bench-edge.sh
#   JSON_DIR=bench-out scripts/bench-edge.sh   # also keep each run's JSON result there
set -euo pipefail
cd "$(dirname "$0")/.."

# stream-ws:N = WebSocket run with N streams per socket (stream-ws uses WS_STREAMS_PER_SOCKET).
RUNS=${RUNS:-"stream-sse stream-ws stream-ws:1 idle-sse idle-ws idle-ws-subscribed"}
STREAMS=${STREAMS:-1000}               # concurrent streams of the stream runs
MAX_TOKENS=${MAX_TOKENS:-300}
TTFT_MS=${TTFT_MS:-100}
INTER_TOKEN_MS=${INTER_TOKEN_MS:-20}   # 20 ms = 50 tokens/s
RAMP_SECS=${RAMP_SECS:-5}
WARMUP_SECS=${WARMUP_SECS:-5}
MEASURE_SECS=${MEASURE_SECS:-20}
WS_STREAMS_PER_SOCKET=${WS_STREAMS_PER_SOCKET:-50}  # the edge allows 64 per socket
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
SERVER_CPU=${SERVER_CPU:-0}            # core the edge is pinned to
CLIENT_CPU=${CLIENT_CPU:-1}            # core the load client is pinned to
RUN_TIMEOUT=${RUN_TIMEOUT:-180}        # seconds, per run
EDGE_ARGS=${EDGE_ARGS:-}               # extra tokenfan-edge flags
NICE=${NICE:-}                         # e.g. -10: run edge and client at that nice level
BUILD=${BUILD:-1}                      # 0 = use the existing release binaries
JSON_DIR=${JSON_DIR:-}                 # a directory: each run writes <run>.json there
LABEL=${LABEL:-tokenfan}               # --label of the JSON results

if [[ "$BUILD" == 1 ]]; then
  cargo build --release --locked -p tokenfan-edge --bin tokenfan-edge \
    -p tokenfan-loadgen --bin tokenfan-loadgen >&2
fi
SERVER_BIN=target/release/tokenfan-edge
CLIENT_BIN=target/release/tokenfan-loadgen
for bin in "$SERVER_BIN" "$CLIENT_BIN"; do
  [[ -x "$bin" ]] || { echo "missing $bin (run with BUILD=1)" >&2; exit 1; }
done

# Both processes hold IDLE_CONNECTIONS sockets (plus a few): raise the descriptor limit as far
# as the hard limit allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if (( $(ulimit -n) < IDLE_CONNECTIONS + 512 )); then
  echo "open-files limit $(ulimit -n) is too low for $IDLE_CONNECTIONS connections" >&2
  exit 1
fi

nice=()
[[ -n "$NICE" ]] && nice=(nice -n "$NICE")

workdir=$(mktemp -d)
edge_pid=
edge_addr=
stop_edge() {
  if [[ -n "$edge_pid" ]] && kill -0 "$edge_pid" 2>/dev/null; then
    kill -TERM "$edge_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$edge_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$edge_pid" 2>/dev/null || true
    wait "$edge_pid" 2>/dev/null || true
  fi
  edge_pid=
}
cleanup() {
  stop_edge
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fresh edge on a free loopback port, pinned to SERVER_CPU (tokio then runs one worker: the
# runtime sizes itself from the CPU affinity). The address comes from its JSON start-up line.
start_edge() {
  local log=$1
  # shellcheck disable=SC2086
  NO_COLOR=1 "${nice[@]}" taskset -c "$SERVER_CPU" "$SERVER_BIN" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json --log-filter warn,tokenfan_edge=info \
    --shutdown-grace-secs 1 $EDGE_ARGS 2>"$log" &
  edge_pid=$!
  edge_addr=
  for _ in $(seq 200); do
    edge_addr=$(grep -F '"tokenfan-edge listening"' "$log" 2>/dev/null \
      | grep -o '"addr":"[0-9.]*:[0-9]*"' | head -n1 | cut -d'"' -f4 || true)
    edge_admin=$(grep -F '"tokenfan-edge listening"' "$log" 2>/dev/null \
      | grep -o '"admin_addr":"[0-9.]*:[0-9]*"' | head -n1 | cut -d'"' -f4 || true)
    [[ -n "$edge_addr" ]] && break
    kill -0 "$edge_pid" 2>/dev/null || { cat "$log" >&2; echo "the edge exited" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n "$edge_addr" ]] || { cat "$log" >&2; echo "the edge did not start" >&2; exit 1; }
  for _ in $(seq 200); do
    [[ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 1 \
      "http://$edge_admin/readyz" || true)" == 200 ]] && return 0
    sleep 0.1
  done
  cat "$log" >&2
  echo "the edge at $edge_addr did not become ready" >&2
  exit 1
}

run() {
  local name=$1
  shift
  local log="$workdir/edge-$name.log"
  start_edge "$log"
  echo
  echo "### $name  $(date -u +%Y-%m-%dT%H:%M:%SZ)  load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# edge pid $edge_pid at $edge_addr, $(taskset -pc "$edge_pid" | sed 's/.*: /cpus /'); client: taskset -c $CLIENT_CPU"
  local out=()
  [[ -n "$JSON_DIR" ]] && out=(--json "$JSON_DIR/$name.json" --label "$LABEL")
  echo "# client: tokenfan-loadgen $* --target http://$edge_addr --server-pid $edge_pid ${out[*]}"
  local rc=0
  timeout --signal=INT --kill-after=10 "$RUN_TIMEOUT" \
    "${nice[@]}" taskset -c "$CLIENT_CPU" "$CLIENT_BIN" "$@" \
      --target "http://$edge_addr" --metrics-url "http://$edge_admin" \
      --server-pid "$edge_pid" "${out[@]}" || rc=$?
  # 1 = the run counted errors or violations (see its RESULT line), 2 = it could not run.
  (( rc == 0 )) || echo "# tokenfan-loadgen exited with status $rc"
  local warns
  warns=$(grep -c -E '"level":"(WARN|ERROR)"' "$log" || true)
  echo "# edge log: $warns WARN/ERROR lines"
  grep -E '"level":"(WARN|ERROR)"' "$log" | head -n 5 || true
  stop_edge
}

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(nproc) cores  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')  $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' (with local changes)')  open-files limit $(ulimit -n)${NICE:+  nice $NICE}"

[[ -n "$JSON_DIR" ]] && mkdir -p "$JSON_DIR"
stream_args=(--concurrency "$STREAMS" --max-tokens "$MAX_TOKENS" --ttft-ms "$TTFT_MS"
  --inter-token-ms "$INTER_TOKEN_MS" --ramp "$RAMP_SECS" --warmup "$WARMUP_SECS"
  --duration "$MEASURE_SECS" --metrics --quiet)
for r in $RUNS; do
  case "$r" in
    stream-sse) run "$r" native "${stream_args[@]}" ;;
    stream-ws) run "$r" ws --streams-per-socket "$WS_STREAMS_PER_SOCKET" "${stream_args[@]}" ;;
    stream-ws:*) run "$r" ws --streams-per-socket "${r#stream-ws:}" "${stream_args[@]}" ;;
    idle-sse) run "$r" idle --kind sse --connections "$IDLE_CONNECTIONS" ;;
    idle-ws) run "$r" idle --kind ws --connections "$IDLE_CONNECTIONS" ;;
    idle-ws-subscribed) run "$r" idle --kind ws-subscribed --connections "$IDLE_CONNECTIONS" ;;
    *) echo "unknown run $r (stream-sse stream-ws stream-ws:N idle-sse idle-ws idle-ws-subscribed)" >&2
      exit 2 ;;
  esac
done
