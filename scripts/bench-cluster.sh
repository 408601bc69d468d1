#!/usr/bin/env bash
# Cluster benchmarks (not tests), against the local cluster of `make cluster-up` (3 edges,
# 2 generators, NATS, Redis, nginx on loopback):
#   1. scale: the same POST-SSE workload (STREAMS concurrent streams at 50 tokens/s) sent to
#      one replica directly (127.0.0.1:8081), then to nginx (127.0.0.1:8080) in front of the
#      three: tokens/s delivered and the delay the edge adds (p50/p99).
#   2. fan-out: one stream watched by VIEWERS EventSource viewers spread round-robin over the
#      three replicas (a third on the owner, two thirds through NATS mirrors): delivery delay
#      from the generator's emit time, p50/p99.
# Every stream and every viewer is verified (complete, exactly once, in order); a run with an
# error or a violation fails the script. Results: JSON per run, a chart and a summary table in
# OUT. See docs/benchmarks.md for the figures recorded and the machine they came from.
#
# Every run is a horizontal load test: LOADGENS load generator processes (FANOUT_LOADGENS for
# the fan-out run) share its streams, start their ramp at the same --start-at and write one
# result each (OUT/<run>/part-<i>.json); `tokenfan-loadgen merge` makes the run's result
# (OUT/<run>.json: counters summed, percentiles from the merged histograms), so the figures
# are not limited by one load generator thread. Server CPU, memory and /metrics counters are
# read by part 0 only (the other parts would read the same processes).
#
#   scripts/bench-cluster.sh                 # brings the cluster up (and leaves it up)
#   STREAMS=200 VIEWERS=500 LOADGENS=3 scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-300}              # concurrent streams of the scale runs
VIEWERS=${VIEWERS:-1000}             # viewers of the fan-out stream
MAX_TOKENS=${MAX_TOKENS:-300}
INTER_TOKEN_MS=${INTER_TOKEN_MS:-20} # 50 tokens/s
FANOUT_TTFT_MS=${FANOUT_TTFT_MS:-5000}  # time for every viewer to attach before the first token
FANOUT_TOKENS=${FANOUT_TOKENS:-500}
RAMP_SECS=${RAMP_SECS:-5}
WARMUP_SECS=${WARMUP_SECS:-5}
MEASURE_SECS=${MEASURE_SECS:-20}
LOADGEN_CPU=${LOADGEN_CPU:-}         # e.g. 1: pin the load generator to that core
CLUSTER_UP=${CLUSTER_UP:-1}          # 0 = the cluster is already up
OUT=${OUT:-target/bench-cluster}
RUNS=${RUNS:-"one three fanout"}
LOADGENS=${LOADGENS:-2}              # load generator processes per scale run (merged)
FANOUT_LOADGENS=${FANOUT_LOADGENS:-1} # ... of the fan-out run: each makes its own stream,
                                     # with VIEWERS / FANOUT_LOADGENS viewers
START_LEAD_SECS=${START_LEAD_SECS:-5} # from launch to the shared --start-at

run_dir=.run/cluster
loadgen=${LOADGEN:-target/release/tokenfan-loadgen}  # LOADGEN: another build of it
if [[ "$CLUSTER_UP" == 1 ]]; then
  scripts/cluster.sh up
fi
[[ -x "$loadgen" ]] || cargo build --release --locked -p tokenfan-loadgen
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"

pid_of() { cat "$run_dir/$1.pid"; }
edge_pids="$(pid_of edge-1),$(pid_of edge-2),$(pid_of edge-3)"
pin=()
[[ -n "$LOADGEN_CPU" ]] && pin=(taskset -c "$LOADGEN_CPU")

common=(--max-tokens "$MAX_TOKENS" --inter-token-ms "$INTER_TOKEN_MS" --ttft-ms 100
  --ramp "$RAMP_SECS" --warmup "$WARMUP_SECS" --duration "$MEASURE_SECS" -q)

# horizontal RUN N TOTAL ARGS...: N load generator processes with TOTAL streams between them
# (part i gets its share; seeds 2^32 apart), one --start-at, then merged into OUT/RUN.json.
# In ARGS, @SERVER@ expands to part 0's server options (--server-pid, --metrics).
horizontal() {
  local run=$1 n=$2 total=$3
  shift 3
  local dir="$OUT/$run" start_at pids=() i share status=0
  rm -rf "$dir"
  mkdir -p "$dir"
  start_at=$(($(date +%s) + START_LEAD_SECS))
  for ((i = 0; i < n; i++)); do
    share=$(((total + n - 1 - i) / n))
    local args=()
    for a in "$@"; do
      if [[ "$a" == @SERVER@ ]]; then
        ((i == 0)) && args+=(--server-pid "$server_pids" --metrics)
      else
        args+=("$a")
      fi
    done
    "${pin[@]}" "$loadgen" "${args[@]}" --concurrency "$share" --seed $((24301 + i * 4294967296)) \
      --start-at "$start_at" --json "$dir/part-$i.json" >"$dir/part-$i.txt" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  "$loadgen" merge "$dir"/part-*.json --json "$OUT/$run.json" || status=1
  return $status
}

failed=0
for run in $RUNS; do
  case "$run" in
    one)
      echo "== scale: $STREAMS streams on one replica (edge-1 directly), $LOADGENS load generators" >&2
      server_pids="$(pid_of edge-1)"
      horizontal one "$LOADGENS" "$STREAMS" native --target http://127.0.0.1:8081 \
        "${common[@]}" @SERVER@ --label "1 replica" || failed=1
      ;;
    three)
      echo "== scale: $STREAMS streams through nginx over three replicas, $LOADGENS load generators" >&2
      server_pids="$edge_pids"
      horizontal three "$LOADGENS" "$STREAMS" native --target http://127.0.0.1:8080 \
        "${common[@]}" @SERVER@ --label "3 replicas (nginx)" || failed=1
      ;;
    fanout)
      echo "== fan-out: $FANOUT_LOADGENS stream(s) x $VIEWERS viewers over three replicas" >&2
      server_pids="$edge_pids"
      horizontal fanout "$FANOUT_LOADGENS" "$FANOUT_LOADGENS" watch \
        --target http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083 \
        --viewers $((VIEWERS / FANOUT_LOADGENS)) --ttft-ms "$FANOUT_TTFT_MS" \
        --max-tokens "$FANOUT_TOKENS" --inter-token-ms "$INTER_TOKEN_MS" \
        --ramp 0 --warmup 0 --duration "$MEASURE_SECS" -q @SERVER@ \
        --label "fan-out ${FANOUT_LOADGENS}x$VIEWERS" || failed=1
      ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done

files=()
for run in $RUNS; do [[ -s "$OUT/$run.json" ]] && files+=("$OUT/$run.json"); done
if ((${#files[@]} > 0)); then
  "$loadgen" chart --out "$OUT/cluster.svg" --title "tokenfan cluster: added delay" "${files[@]}"
fi

echo
echo "| run | load generators | streams × viewers | tokens/s | added delay p50 / p99 / max (ms) | errors | violations | loadgen CPU (sum) | edges CPU |"
echo "|---|---|---|---|---|---|---|---|---|"
for run in $RUNS; do
  f="$OUT/$run.json"
  [[ -s "$f" ]] || continue
  # Server CPU comes from part 0, which alone read the servers.
  p0="$OUT/$run/part-0.json"
  [[ -s "$p0" ]] || p0=/dev/null
  jq -r --slurpfile p0 "$p0" '
    def r: . * 10 | round / 10;
    "| \(.label) | \(.parts | length) | \(.config.concurrency) × \(if .scenario == "watch" then .config.viewers * (.parts | length) else 1 end) | \(.total.tokens_per_sec | round) | \(.total.added_delay_ms.p50 | r) / \(.total.added_delay_ms.p99 | r) / \(.total.added_delay_ms.max | r) | \(.error_total) | \(.violation_total) | \([.parts[].loadgen_pct_of_core // 0] | add | round) % | \([$p0[0].cpu.servers[]?.pct_of_core] | add // 0 | round) % |"
  ' "$f"
done
echo
echo "JSON (per part and merged) and chart in $OUT"
exit "$failed"
