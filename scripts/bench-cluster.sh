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
#   scripts/bench-cluster.sh                 # brings the cluster up (and leaves it up)
#   STREAMS=200 VIEWERS=500 scripts/bench-cluster.sh
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

run_dir=.run/cluster
loadgen=target/release/tokenfan-loadgen
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
  --ramp "$RAMP_SECS" --warmup "$WARMUP_SECS" --duration "$MEASURE_SECS" --metrics -q
  --metrics-target http://127.0.0.1:9481,http://127.0.0.1:9482,http://127.0.0.1:9483)

for run in $RUNS; do
  case "$run" in
    one)
      echo "== scale: $STREAMS streams on one replica (edge-1 directly)" >&2
      "${pin[@]}" "$loadgen" native --target http://127.0.0.1:8081 --concurrency "$STREAMS" \
        "${common[@]}" --server-pid "$(pid_of edge-1)" \
        --label "1 replica" --json "$OUT/one.json"
      ;;
    three)
      echo "== scale: $STREAMS streams through nginx over three replicas" >&2
      "${pin[@]}" "$loadgen" native --target http://127.0.0.1:8080 --concurrency "$STREAMS" \
        "${common[@]}" --server-pid "$edge_pids" \
        --label "3 replicas (nginx)" --json "$OUT/three.json"
      ;;
    fanout)
      echo "== fan-out: 1 stream x $VIEWERS viewers over three replicas" >&2
      "${pin[@]}" "$loadgen" watch \
        --target http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083 \
        --concurrency 1 --viewers "$VIEWERS" --ttft-ms "$FANOUT_TTFT_MS" \
        --max-tokens "$FANOUT_TOKENS" --inter-token-ms "$INTER_TOKEN_MS" \
        --ramp 0 --warmup 0 --duration "$MEASURE_SECS" --metrics -q \
        --metrics-target http://127.0.0.1:9481,http://127.0.0.1:9482,http://127.0.0.1:9483 \
        --server-pid "$edge_pids" --label "fan-out 1x$VIEWERS" --json "$OUT/fanout.json"
      ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done

files=()
for run in $RUNS; do files+=("$OUT/$run.json"); done
"$loadgen" chart --out "$OUT/cluster.svg" --title "tokenfan cluster: added delay" "${files[@]}"

echo
echo "| run | streams × viewers | tokens/s | added delay p50 / p99 / max (ms) | errors | violations | loadgen CPU | edges CPU |"
echo "|---|---|---|---|---|---|---|---|"
for f in "${files[@]}"; do
  jq -r '
    def r: . * 10 | round / 10;
    (.violations | to_entries | map(.value) | add // 0) as $v
    | (.errors | to_entries | map(.value) | add // 0) as $e
    | "| \(.label) | \(.config.concurrency) × \(if .scenario == "watch" then .config.viewers else 1 end) | \(.total.tokens_per_sec | round) | \(.total.added_delay_ms.p50 | r) / \(.total.added_delay_ms.p99 | r) / \(.total.added_delay_ms.max | r) | \($e) | \($v) | \(.cpu.loadgen_pct_of_core | round) % | \([.cpu.servers[]?.pct_of_core] | add // 0 | round) % |"
  ' "$f"
done
echo
echo "JSON and chart in $OUT"
