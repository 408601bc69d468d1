#!/usr/bin/env bash
# Side-by-side benchmark (make bench): tokenfan and its peers under the same load generator.
#
#   scripts/bench.sh                    # every scenario and system (see docs/benchmarks.md, "Peers")
#   QUICK=1 scripts/bench.sh            # one small step per system: checks that everything runs
#   SCENARIOS="watch" SYSTEMS="tokenfan pushpin" STEPS="100 500" scripts/bench.sh
#
# Systems (each started fresh for every step, the whole process tree pinned to SERVER_CPU with
# taskset; the load generator pinned to CLIENT_CPU):
#   tokenfan   tokenfan-edge, embedded mode: the mock generator runs in the same process (the
#              peers generate their tokens in-process too)
#   express    bench/peers/express (Node.js + Express + ws)
#   pushpin    bench/peers/pushpin: Pushpin (condure, zurl, pushpin-proxy, pushpin-handler) and its
#              Node origin/publisher; watch and longpoll only
#   generator  tokenfan-generator read directly over gRPC: the generator's floor (scenario grpc only)
#   floor      bench/peers/floor (tokenfan-floor): the smallest POST-SSE server, tokio and one
#              write per token, no HTTP library: the delivery floor (scenarios native and wrk)
# Scenarios: wrk (POST-SSE streams of WRK_TOKENS tokens, each a new POST on a kept-alive
# connection, at every step of WRK_STEPS whatever the verdict: the issue-13 measurement),
# native (POST-SSE), watch (K streams × VIEWERS GET-SSE viewers), ws, longpoll, shortpoll, grpc,
# idle (resident memory per idle SSE connection).
#
#   SCENARIOS=wrk SYSTEMS="tokenfan floor express" scripts/bench.sh    # the two wrk steps alone
#
# For every (scenario, system) the concurrency steps run in order until one fails (errors or
# verification violations, or p99 above the limits: see bench/summarize.py); the last passing
# step is "the most streams held". Each step writes <scenario>-<system>-<c>.json (the loadgen's
# report) and .meta.json (memory and connections sampled mid-window, the verdict) into RESULTS;
# the end prints a markdown table (also RESULTS/summary.md) and writes one SVG chart per scenario.
#
# Every parameter can be set from the environment; the defaults are below.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
  STEPS=${STEPS:-20}
  WATCH_STEPS=${WATCH_STEPS:-4}
  VIEWERS=${VIEWERS:-3}
  DURATION=${DURATION:-3}
  RAMP=${RAMP:-1}
  WARMUP=${WARMUP:-1}
  MAX_TOKENS=${MAX_TOKENS:-40}
  IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-200}
  WRK_STEPS=${WRK_STEPS:-30}
fi
SCENARIOS=${SCENARIOS:-"wrk native watch ws longpoll shortpoll grpc idle"}
SYSTEMS=${SYSTEMS:-"tokenfan floor express pushpin generator"}
WRK_STEPS=${WRK_STEPS:-"300 1000"}                 # wrk: concurrent POST-SSE streams, every step runs
WRK_TOKENS=${WRK_TOKENS:-50}                        # wrk: tokens per stream (max_tokens)
WRK_TTFT_MS=${WRK_TTFT_MS:-20}                      # wrk: 50 tokens × 20 ms = 1.0 s on schedule
STEPS=${STEPS:-"100 250 500 1000 2000 4000"}     # concurrent streams
WATCH_STEPS=${WATCH_STEPS:-"10 25 50 100 250 400"}  # watch: streams, each with VIEWERS viewers
VIEWERS=${VIEWERS:-10}
WS_STREAMS_PER_SOCKET=${WS_STREAMS_PER_SOCKET:-1}   # one stream per socket, like a browser tab
POLL_INTERVAL_MS=${POLL_INTERVAL_MS:-100}           # shortpoll
POLL_TIMEOUT_MS=${POLL_TIMEOUT_MS:-25000}           # longpoll
DURATION=${DURATION:-20}                            # measured window, seconds
RAMP=${RAMP:-5}
WARMUP=${WARMUP:-5}
MAX_TOKENS=${MAX_TOKENS:-300}
TTFT_MS=${TTFT_MS:-100}
INTER_TOKEN_MS=${INTER_TOKEN_MS:-20}                # 50 tokens/s per stream
P99_LIMIT_MS=${P99_LIMIT_MS:-50}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BUILD=${BUILD:-1}                                   # 0 = use the existing release binaries
RESULTS=${RESULTS:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
PUSHPIN_HTTP_PORT=${PUSHPIN_HTTP_PORT:-27999}
PUSHPIN_PORT_OFFSET=${PUSHPIN_PORT_OFFSET:-20000}
export PUSHPIN_HTTP_PORT PUSHPIN_PORT_OFFSET

BIN=${BIN:-target/release}                          # where the binaries are (BUILD=1 builds release)
EDGE=$BIN/tokenfan-edge
GENERATOR=$BIN/tokenfan-generator
LOADGEN=$BIN/tokenfan-loadgen
FLOOR=$BIN/tokenfan-floor

log() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

if (( $(nproc) < 2 )) && [[ "$SERVER_CPU" == "$CLIENT_CPU" ]]; then
  log "warning: one CPU: server and load generator share it"
elif (( $(nproc) < 2 )); then
  log "one CPU only: set SERVER_CPU=0 CLIENT_CPU=0"
  exit 1
fi

wants() { # wants WORD LIST...
  local w=$1
  shift
  [[ " $* " == *" $w "* ]]
}

# ------------------------------------------------------------------ build and dependencies
if [[ "$BUILD" == 1 ]]; then
  log "building release binaries"
  cargo build --release --locked -p tokenfan-edge -p tokenfan-generator -p tokenfan-loadgen \
    -p tokenfan-floor --bins >&2
fi
for b in "$EDGE" "$GENERATOR" "$LOADGEN" "$FLOOR"; do
  [[ -x "$b" ]] || { log "missing $b (run with BUILD=1)"; exit 1; }
done
deps=(python3:python3 taskset:util-linux ss:iproute2)
if wants express $SYSTEMS || wants pushpin $SYSTEMS; then deps+=(node:nodejs npm:npm); fi
if wants pushpin $SYSTEMS; then deps+=(pushpin:pushpin); fi
scripts/install-deps.sh "${deps[@]}"
if wants express $SYSTEMS || wants pushpin $SYSTEMS; then
  peer=bench/peers/express
  if [[ ! -f "$peer/node_modules/express/package.json" ]] \
    || [[ "$peer/package-lock.json" -nt "$peer/node_modules/.package-lock.json" ]]; then
    log "installing the Express peer's packages (npm ci)"
    (cd "$peer" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi

# The largest steps hold tens of thousands of sockets on each side.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
work=$(mktemp -d)

# ------------------------------------------------------------------ servers
srv_root=      # pid of the process started (its whole tree is the system under test)
srv_url=       # base URL (http://127.0.0.1:PORT)
srv_port=

stop_server() {
  [[ -n "$srv_root" ]] || return 0
  local tree
  tree=$(tree_pids "$srv_root" || true)
  kill -TERM "$srv_root" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$srv_root" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$srv_root" 2>/dev/null || true
  wait "$srv_root" 2>/dev/null || true
  # Anything of its tree still alive (Pushpin's services stop with their runner).
  local p
  for p in $tree; do kill -KILL "$p" 2>/dev/null || true; done
  srv_root=
}
cleanup() {
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# tree_pids ROOT: ROOT and all its descendants.
tree_pids() {
  ps -e -o pid=,ppid= | awk -v r="$1" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q != "" && q > 1) { if (q == r) { print p; break } q = parent[q] } } }'
}

# rss_kib PID...: summed VmRSS.
rss_kib() {
  local total=0 p v
  for p in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# conns PORT: established client connections to the server's port.
conns() {
  ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l
}

wait_line() { # wait_line FILE PATTERN SECONDS -> first match
  local file=$1 pattern=$2 secs=$3 got=
  for _ in $(seq $((secs * 10))); do
    got=$(grep -o -m1 -E "$pattern" "$file" 2>/dev/null || true)
    [[ -n "$got" ]] && { echo "$got"; return 0; }
    kill -0 "$srv_root" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# start_server SYSTEM LOG: sets srv_root, srv_url, srv_port. In a script without job control a
# background job is no process-group leader, so setsid execs in place and $! is the server.
start_server() {
  local system=$1 log=$2 addr
  case "$system" in
    tokenfan)
      NO_COLOR=1 setsid taskset -c "$SERVER_CPU" "$EDGE" --listen 127.0.0.1:0 --log-format json \
        --admin-listen 127.0.0.1:0 \
        --log-filter warn,tokenfan_edge=info --shutdown-grace-secs 1 >"$log" 2>&1 &
      srv_root=$!
      addr=$(wait_line "$log" '"addr":"[0-9.]+:[0-9]+"' 30 | cut -d'"' -f4) || { tail -n 20 "$log" >&2; return 1; }
      # /metrics is on the admin listener only.
      srv_admin=$(wait_line "$log" '"admin_addr":"[0-9.]+:[0-9]+"' 30 | cut -d'"' -f4) || { tail -n 20 "$log" >&2; return 1; }
      ;;
    express)
      setsid taskset -c "$SERVER_CPU" node bench/peers/express/server.js --listen 127.0.0.1:0 >"$log" 2>&1 &
      srv_root=$!
      addr=$(wait_line "$log" 'listening on http://[0-9.]+:[0-9]+' 30 | sed 's#.*http://##') || { tail -n 20 "$log" >&2; return 1; }
      ;;
    pushpin)
      PUSHPIN_LOG_DIR="${log%.server.log}.pushpin" setsid taskset -c "$SERVER_CPU" bench/peers/pushpin/run.sh >"$log" 2>&1 &
      srv_root=$!
      addr=$(wait_line "$log" 'listening on http://[0-9.]+:[0-9]+' 60 | sed 's#.*http://##') || { tail -n 20 "$log" >&2; return 1; }
      ;;
    floor)
      setsid taskset -c "$SERVER_CPU" "$FLOOR" --listen 127.0.0.1:0 >"$log" 2>&1 &
      srv_root=$!
      addr=$(wait_line "$log" 'listening on http://[0-9.]+:[0-9]+' 30 | sed 's#.*http://##') || { tail -n 20 "$log" >&2; return 1; }
      ;;
    generator)
      NO_COLOR=1 TOKENFAN_LOG=warn,tokenfan_generator=info setsid taskset -c "$SERVER_CPU" "$GENERATOR" \
        --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --max-generations 1000000 \
        --shutdown-grace-secs 1 >"$log" 2>&1 &
      srv_root=$!
      addr=$(wait_line "$log" 'grpc=[0-9.]+:[0-9]+' 30 | sed 's/\x1b\[[0-9;]*m//g; s/grpc=//') || { tail -n 20 "$log" >&2; return 1; }
      ;;
    *) log "unknown system $system"; return 1 ;;
  esac
  srv_url="http://$addr"
  srv_port=${addr##*:}
  # Ready: HTTP systems answer /healthz; the generator accepts connections.
  for _ in $(seq 100); do
    if [[ "$system" == generator ]]; then
      (exec 3<>"/dev/tcp/${addr%:*}/$srv_port") 2>/dev/null && return 0
    elif [[ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 1 "$srv_url/healthz" || true)" == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  log "$system at $srv_url did not become ready"
  return 1
}

# ------------------------------------------------------------------ one step
applies() { # applies SCENARIO SYSTEM
  case "$1:$2" in
    grpc:generator) return 0 ;;
    grpc:* | *:generator) return 1 ;;
    native:floor | wrk:floor) return 0 ;;
    *:floor) return 1 ;;
    wrk:pushpin) return 1 ;;
    watch:pushpin | longpoll:pushpin | idle:pushpin) return 0 ;;
    *:pushpin) return 1 ;;
    *) return 0 ;;
  esac
}

# run_step SCENARIO SYSTEM CONCURRENCY -> prints the verdict
run_step() {
  local scenario=$1 system=$2 c=$3
  local name="$scenario-$system-$c"
  local out="$RESULTS/$name.json" meta="$RESULTS/$name.meta.json" slog="$RESULTS/$name.server.log"
  local limit=$P99_LIMIT_MS
  [[ "$scenario" == shortpoll ]] && limit=$((P99_LIMIT_MS + POLL_INTERVAL_MS))

  if ! start_server "$system" "$slog"; then
    stop_server
    printf '{"scenario":"%s","system":"%s","concurrency":%s,"result":"%s","verdict":"fail: server did not start","limit_ms":%s}\n' \
      "$scenario" "$system" "$c" "$name.json" "$limit" >"$meta"
    echo "fail: server did not start"
    return 0
  fi
  sleep 1
  # shellcheck disable=SC2207
  local pids=($(tree_pids "$srv_root"))
  local pid_list
  pid_list=$(IFS=,; echo "${pids[*]}")
  local rss_base
  rss_base=$(rss_kib "${pids[@]}")

  # wrk: POST-SSE (the loadgen's native scenario) with its own stream length and first token.
  local verb=$scenario tokens=$MAX_TOKENS ttft=$TTFT_MS
  if [[ "$scenario" == wrk ]]; then
    verb=native tokens=$WRK_TOKENS ttft=$WRK_TTFT_MS
  fi
  local cmd=()
  local mid_secs
  if [[ "$scenario" == idle ]]; then
    cmd=(idle --kind sse --connections "$c" --target "$srv_url" --server-pid "${pids[0]}" --no-metrics
      --settle-secs 3 --json "$out" --label "$system")
  else
    cmd=("$verb" --target "$srv_url" --concurrency "$c" --duration "$DURATION" --ramp "$RAMP"
      --warmup "$WARMUP" --max-tokens "$tokens" --ttft-ms "$ttft" --inter-token-ms "$INTER_TOKEN_MS"
      --jitter-ms 0 --server-pid "$pid_list" --label "$system" --json "$out" --quiet)
    case "$scenario" in
      watch) cmd+=(--viewers "$VIEWERS") ;;
      ws) cmd+=(--streams-per-socket "$WS_STREAMS_PER_SOCKET") ;;
      longpoll) cmd+=(--poll-timeout-ms "$POLL_TIMEOUT_MS") ;;
      shortpoll) cmd+=(--poll-interval-ms "$POLL_INTERVAL_MS") ;;
    esac
    [[ "$system" == tokenfan ]] && cmd+=(--metrics --metrics-url "http://$srv_admin")
  fi
  log "$name: $system at $srv_url (pids ${pids[*]}, cpus $(taskset -pc "$srv_root" | sed 's/.*: //'))"
  echo "taskset -c $CLIENT_CPU $LOADGEN ${cmd[*]}" >"$RESULTS/$name.cmd"
  local limit_secs=300
  [[ "$scenario" == idle ]] || limit_secs=$(awk -v r="$RAMP" -v w="$WARMUP" -v d="$DURATION" \
    -v t="$tokens" -v f="$ttft" -v g="$INTER_TOKEN_MS" 'BEGIN { printf "%d", r + w + d + 2 * (f + t * g) / 1000 + 120 }')
  timeout --signal=INT --kill-after=10 "$limit_secs" \
    taskset -c "$CLIENT_CPU" "$LOADGEN" "${cmd[@]}" >"$RESULTS/$name.txt" 2>&1 &
  local lg=$!

  # Memory and connections in the middle of the measured window (idle: once all are open).
  local rss_mid= conns_mid=
  if [[ "$scenario" == idle ]]; then
    for _ in $(seq 600); do
      conns_mid=$(conns "$srv_port")
      (( conns_mid >= c )) && break
      kill -0 "$lg" 2>/dev/null || break
      sleep 0.1
    done
    sleep 1
  else
    mid_secs=$(awk -v r="$RAMP" -v w="$WARMUP" -v d="$DURATION" 'BEGIN { print r + w + d / 2 }')
    sleep "$mid_secs"
  fi
  # shellcheck disable=SC2207
  pids=($(tree_pids "$srv_root"))
  rss_mid=$(rss_kib "${pids[@]}")
  [[ "$system" == generator ]] || conns_mid=$(conns "$srv_port")

  local rc=0
  wait "$lg" || rc=$?
  stop_server
  printf '{"scenario":"%s","system":"%s","concurrency":%s,"result":"%s","rss_base_kib":%s,"rss_mid_kib":%s,"connections_mid":%s,"loadgen_rc":%s,"limit_ms":%s,"viewers":%s,"server_cpu":"%s","client_cpu":"%s"}\n' \
    "$scenario" "$system" "$c" "$name.json" "$rss_base" "$rss_mid" "${conns_mid:-null}" "$rc" "$limit" \
    "$([[ "$scenario" == watch ]] && echo "$VIEWERS" || echo null)" "$SERVER_CPU" "$CLIENT_CPU" >"$meta.tmp"
  local v
  if [[ "$scenario" == idle ]]; then
    v=$([[ "$rc" == 0 ]] && echo pass || echo "fail: loadgen exited $rc")
  else
    v=$(python3 bench/summarize.py verdict "$out" "$meta.tmp")
  fi
  python3 - "$meta.tmp" "$meta" "$v" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["verdict"] = sys.argv[3]
json.dump(m, open(sys.argv[2], "w"))
PY
  rm -f "$meta.tmp"
  echo "$v"
}

# ------------------------------------------------------------------ the run
started=$(date +%s)
{
  echo "# tokenfan side-by-side benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# $(nproc) cores  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')  $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)  kernel $(uname -r)"
  echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo '?')  node $(node --version 2>/dev/null || echo -)  pushpin $(pushpin --version 2>/dev/null | awk '{print $2}' || echo -)"
  echo "# SCENARIOS=\"$SCENARIOS\" SYSTEMS=\"$SYSTEMS\" STEPS=\"$STEPS\" WRK_STEPS=\"$WRK_STEPS\" WRK_TOKENS=$WRK_TOKENS WRK_TTFT_MS=$WRK_TTFT_MS WATCH_STEPS=\"$WATCH_STEPS\" VIEWERS=$VIEWERS DURATION=$DURATION RAMP=$RAMP WARMUP=$WARMUP MAX_TOKENS=$MAX_TOKENS TTFT_MS=$TTFT_MS INTER_TOKEN_MS=$INTER_TOKEN_MS P99_LIMIT_MS=$P99_LIMIT_MS SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU"
} | tee "$RESULTS/machine.txt" >&2

for scenario in $SCENARIOS; do
  case "$scenario" in
    wrk | native | watch | ws | longpoll | shortpoll | grpc | idle) ;;
    *) log "unknown scenario $scenario (wrk native watch ws longpoll shortpoll grpc idle)"; exit 2 ;;
  esac
  steps=$STEPS
  [[ "$scenario" == watch ]] && steps=$WATCH_STEPS
  [[ "$scenario" == wrk ]] && steps=$WRK_STEPS
  [[ "$scenario" == idle ]] && steps=$IDLE_CONNECTIONS
  for system in $SYSTEMS; do
    applies "$scenario" "$system" || continue
    for c in $steps; do
      v=$(run_step "$scenario" "$system" "$c")
      log "$scenario $system $c: $v"
      # wrk measures every step; the other scenarios search for the most streams held.
      [[ "$v" == pass || "$scenario" == wrk ]] || break
      [[ "$QUICK" == 1 ]] && break
    done
  done
done

# ------------------------------------------------------------------ report
while read -r scenario files; do
  [[ -n "$scenario" ]] || continue
  # shellcheck disable=SC2086
  "$LOADGEN" chart --out "$RESULTS/$scenario.svg" --log-y \
    --title "$scenario: each system at the most streams it held" $files \
    >/dev/null 2>"$work/chart.err" || { log "chart $scenario failed:"; cat "$work/chart.err" >&2; }
done < <(python3 bench/summarize.py charts "$RESULTS")

echo
python3 bench/summarize.py table "$RESULTS"
echo
log "results in $RESULTS ($(( $(date +%s) - started )) s); charts: $(cd "$RESULTS" && ls ./*.svg 2>/dev/null | tr '\n' ' ')"
