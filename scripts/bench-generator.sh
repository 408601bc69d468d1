#!/usr/bin/env bash
# Generator scale benchmark (not a test): holds STREAMS concurrent generations at 50 tokens/s
# against a tokenfan-generator pinned to one CPU core, and reports schedule lag and CPU use.
# See docs/benchmarks.md for what the numbers mean and the last recorded results.
#
# Every parameter can be overridden from the environment, e.g.
#   STREAMS=5000 MEASURE_SECS=20 scripts/bench-generator.sh
#   JSON=1 scripts/bench-generator.sh > result.json
set -euo pipefail
cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-10000}            # generations kept open at once
CONNECTIONS=${CONNECTIONS:-64}       # HTTP/2 connections they are spread over
CONNECTION_WINDOW_KIB=${CONNECTION_WINDOW_KIB:-1024}  # HTTP/2 connection receive window
MAX_TOKENS=${MAX_TOKENS:-200}        # per call; slots start a new call when one ends
TTFT_MS=${TTFT_MS:-100}
INTER_TOKEN_MS=${INTER_TOKEN_MS:-20} # 20 ms = 50 tokens/s
RAMP_SECS=${RAMP_SECS:-5}
WARMUP_SECS=${WARMUP_SECS:-5}
MEASURE_SECS=${MEASURE_SECS:-30}
SERVER_CPU=${SERVER_CPU:-0}          # core the generator is pinned to
CLIENT_CPU=${CLIENT_CPU:-1}          # core the load client is pinned to
SERVER_WORKERS=${SERVER_WORKERS:-1}  # TOKIO_WORKER_THREADS of the generator
CLIENT_THREADS=${CLIENT_THREADS:-1}  # 1 = current-thread runtime in the client
MAX_GENERATIONS=${MAX_GENERATIONS:-$((STREAMS * 2))}
NICE=${NICE:-0}                      # e.g. -10: favour generator and client over other load
                                     # (each runs in its own session, so with autogroup
                                     # scheduling the session's autogroup gets this nice too)
BUILD=${BUILD:-1}                    # 0 = use the existing release binaries
JSON=${JSON:-0}
PERF=${PERF:-0}                      # 1 = perf-record the generator over the measured window
PERF_DATA=${PERF_DATA:-target/bench-generator.perf.data}

if (( $(nproc) < 2 )); then
  echo "warning: one CPU only: set CLIENT_CPU=0; generator and client will then share it" >&2
fi
if [[ "$BUILD" == 1 ]]; then
  cargo build --release -p tokenfan-generator --bins --examples >&2
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
SERVER_BIN=$TARGET_DIR/release/tokenfan-generator
CLIENT_BIN=$TARGET_DIR/release/examples/bench_schedule
for bin in "$SERVER_BIN" "$CLIENT_BIN"; do
  [[ -x "$bin" ]] || { echo "missing $bin (run with BUILD=1)" >&2; exit 1; }
done

workdir=$(mktemp -d)
server_pid=
client_pid=
cleanup() {
  [[ -n "$client_pid" ]] && kill -TERM "$client_pid" 2>/dev/null || true
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

# The generator on one core: pinned with taskset, one tokio worker. Port 0 = any free port;
# the address is read back from its start-up log line. (In a script without job control a
# background job is no process-group leader, so setsid execs in place and $! is the server.)
NO_COLOR=1 TOKIO_WORKER_THREADS=$SERVER_WORKERS TOKENFAN_LOG=warn,tokenfan_generator=info \
  setsid nice -n "$NICE" taskset -c "$SERVER_CPU" "$SERVER_BIN" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --max-generations "$MAX_GENERATIONS" --shutdown-grace-secs 2 \
    2>"$workdir/server.log" &
server_pid=$!
prioritize() { # pid: with autogroup scheduling, plain nice only ranks within a session
  [[ "$NICE" != 0 && -w "/proc/$1/autogroup" ]] || return 0
  local mine group
  mine=$(cut -d' ' -f1 "/proc/$$/autogroup")
  for _ in $(seq 50); do # until setsid has moved it to its own session (never renice ours)
    group=$(cut -d' ' -f1 "/proc/$1/autogroup" 2>/dev/null) || return 0
    if [[ "$group" != "$mine" ]]; then
      echo "$NICE" >"/proc/$1/autogroup" 2>/dev/null || true
      return 0
    fi
    sleep 0.02
  done
}
prioritize "$server_pid"

addr=
for _ in $(seq 100); do
  addr=$(sed 's/\x1b\[[0-9;]*m//g' "$workdir/server.log" 2>/dev/null \
    | grep -o 'grpc=[0-9.]*:[0-9]*' | head -n1 | cut -d= -f2 || true)
  [[ -n "$addr" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$workdir/server.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$addr" ]] || { echo "generator did not start" >&2; cat "$workdir/server.log" >&2; exit 1; }
# Accepting connections (the corpus is tokenized before the first call is served).
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null && break
  sleep 0.1
done
sleep 1

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(nproc) cores  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# generator pid $server_pid at $addr: $(taskset -pc "$server_pid" | sed 's/.*: /cpus /'), TOKIO_WORKER_THREADS=$SERVER_WORKERS"
  echo "# client: taskset -c $CLIENT_CPU, client threads $CLIENT_THREADS; nice $NICE for both ($(cat /proc/$server_pid/autogroup 2>/dev/null || echo 'no autogroup'))"
} >&2

budget=$(awk -v a="$RAMP_SECS" -v b="$WARMUP_SECS" -v c="$MEASURE_SECS" 'BEGIN { printf "%d", a + b + c + 120 }')
json_flag=()
[[ "$JSON" == 1 ]] && json_flag=(--json)
perf_pid=
if [[ "$PERF" == 1 ]]; then
  # Sampled on the software clock (works in VMs without PMU); runs on the client's core.
  after=$(awk -v a="$RAMP_SECS" -v b="$WARMUP_SECS" 'BEGIN { print a + b }')
  (sleep "$after" && exec taskset -c "$CLIENT_CPU" perf record -q -e cpu-clock -F 299 \
      --call-graph dwarf,16384 -p "$server_pid" -o "$PERF_DATA" -- sleep "$MEASURE_SECS") \
    >"$workdir/perf.log" 2>&1 &
  perf_pid=$!
fi
setsid timeout "$budget" nice -n "$NICE" taskset -c "$CLIENT_CPU" "$CLIENT_BIN" \
  --target "http://$addr" \
  --streams "$STREAMS" --connections "$CONNECTIONS" --max-tokens "$MAX_TOKENS" \
  --connection-window-kib "$CONNECTION_WINDOW_KIB" \
  --ttft-ms "$TTFT_MS" --inter-token-ms "$INTER_TOKEN_MS" \
  --ramp-secs "$RAMP_SECS" --warmup-secs "$WARMUP_SECS" --measure-secs "$MEASURE_SECS" \
  --client-threads "$CLIENT_THREADS" --server-pid "$server_pid" \
  --clk-tck "$(getconf CLK_TCK)" "${json_flag[@]}" &
client_pid=$!
prioritize "$client_pid"
status=0
wait "$client_pid" || status=$?

if [[ -n "$perf_pid" ]]; then
  wait "$perf_pid" || { echo "perf record failed:" >&2; cat "$workdir/perf.log" >&2; }
  echo "# perf data: $PERF_DATA (perf report -i $PERF_DATA --no-children)" >&2
fi
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if [[ $status -ne 0 ]]; then
  echo "bench_schedule failed (exit $status); generator log:" >&2
  tail -n 20 "$workdir/server.log" >&2
fi
exit "$status"
