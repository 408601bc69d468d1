#!/usr/bin/env bash
# Soak (not a test): the local cluster of `make cluster-up` under load for SOAK_SECS while a
# chaos loop kills (kill -9) an edge, a generator, NATS or Redis every CHAOS_EVERY seconds and
# brings it back before the next fault: rounds that take every process once, each round in a
# random order (SEED). Two load generators run
# throughout, both reconnecting dropped connections with Last-Event-ID as an EventSource does:
#   - POST-SSE streams through nginx (127.0.0.1:8080), STREAMS at once;
#   - WATCH streams, each read by VIEWERS viewers spread over the three edges directly.
# Every stream is verified (complete, exactly once, in order). The soak passes when no stream
# lost, duplicated or reordered a token, and every stream that did not complete ended with an
# explicit error from the server (an HTTP status with a JSON error, or a terminal `error`
# event) rather than a silent cut. It prints each process's RSS at the start and at the end.
# Results: OUT/{native,watch}.{json,txt}, OUT/chaos.log, OUT/summary.md; see
# docs/reliability.md for a recorded run.
#
#   scripts/soak.sh                       # 5 minutes, a fault every 15 s
#   SOAK_SECS=60 CHAOS_EVERY=10 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECS=${SOAK_SECS:-300}
CHAOS_EVERY=${CHAOS_EVERY:-15}
DOWN_SECS=${DOWN_SECS:-3}          # how long a crashed process stays down
STREAMS=${STREAMS:-100}
WATCH_STREAMS=${WATCH_STREAMS:-10}
VIEWERS=${VIEWERS:-10}
MAX_TOKENS=${MAX_TOKENS:-300}
RESUME_ATTEMPTS=${RESUME_ATTEMPTS:-30}
FAULTS=${FAULTS:-"edge-1 edge-2 edge-3 generator-1 generator-2 nats redis"}
SEED=${SEED:-$RANDOM}
OUT=${OUT:-target/soak}

cluster=scripts/cluster.sh
run_dir=.run/cluster
loadgen=target/release/tokenfan-loadgen
procs="nats redis generator-1 generator-2 edge-1 edge-2 edge-3"

"$cluster" up
mkdir -p "$OUT"
rm -f "$OUT"/*
ulimit -n "$(ulimit -Hn)"

rss_kib() { # name → VmRSS in KiB of its current process
  local pid
  pid=$(cat "$run_dir/$1.pid" 2>/dev/null) || { echo "-"; return; }
  awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "-"
}

declare -A rss_start restarts
for p in $procs; do rss_start[$p]=$(rss_kib "$p"); restarts[$p]=0; done

# Coalescing is part of the protocol (a reader that falls behind, e.g. when a mirror refills a
# NATS gap from Redis at once, gets one event joining the pending tokens, with the last seq):
# accepted, and the text is still checked (every viewer of a stream must get the same text).
common=(--max-tokens "$MAX_TOKENS" --inter-token-ms 20 --ttft-ms 100 --ramp 5 --warmup 0
  --duration "$SOAK_SECS" --resume-attempts "$RESUME_ATTEMPTS" --allow-coalescing
  --progress-secs 10)
"$loadgen" native --target http://127.0.0.1:8080 --concurrency "$STREAMS" "${common[@]}" \
  --label "soak native via nginx" --json "$OUT/native.json" >"$OUT/native.txt" 2>"$OUT/native.err" &
native_pid=$!
"$loadgen" watch --target http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083 \
  --concurrency "$WATCH_STREAMS" --viewers "$VIEWERS" "${common[@]}" \
  --label "soak watch over 3 edges" --json "$OUT/watch.json" >"$OUT/watch.txt" 2>"$OUT/watch.err" &
watch_pid=$!

# The chaos loop: one fault at a time, each process back (and ready) before the next.
RANDOM=$SEED
read -r -a faults <<<"$FAULTS"
end=$((SECONDS + SOAK_SECS))
echo "soak: ${SOAK_SECS}s, a fault every ${CHAOS_EVERY}s from: ${faults[*]} (seed $SEED)" | tee "$OUT/chaos.log"
round=()
while (( SECONDS + CHAOS_EVERY < end )); do
  sleep "$CHAOS_EVERY"
  # Each round takes every fault once, in a random order: every kind happens.
  if (( ${#round[@]} == 0 )); then
    round=("${faults[@]}")
    for ((i = ${#round[@]} - 1; i > 0; i--)); do
      j=$((RANDOM % (i + 1)))
      tmp=${round[i]}; round[i]=${round[j]}; round[j]=$tmp
    done
  fi
  victim=${round[0]}
  round=("${round[@]:1}")
  echo "$(date -u +%T) kill -9 $victim" | tee -a "$OUT/chaos.log"
  "$cluster" kill "$victim"
  sleep "$DOWN_SECS"
  "$cluster" start "$victim"
  restarts[$victim]=$((restarts[$victim] + 1))
  echo "$(date -u +%T) $victim back" | tee -a "$OUT/chaos.log"
done

status=0
wait "$native_pid" || true
wait "$watch_pid" || true

# Pass/fail: no violation anywhere; every error an explicit one.
explicit='^(http_[0-9]+|stream_error_.*|notice_.*)$'
{
  echo "## Soak: ${SOAK_SECS} s, a fault every ${CHAOS_EVERY} s (seed $SEED)"
  echo
  echo "| load | streams completed / started | readers clean / started | tokens received | violations | explicit errors | other errors | resumes (by cause) |"
  echo "|---|---|---|---|---|---|---|---|"
  for f in native watch; do
    jq -r --arg re "$explicit" '
      (.errors | to_entries) as $e
      | "| \(.label) | \(.total.streams_completed) / \(.total.streams_started) | \(.total.readers_clean) / \(.total.readers_started) | \(.total.tokens_total) | \(.violation_total) | \([$e[] | select(.key | test($re)) | .value] | add // 0) \([$e[] | select(.key | test($re)) | "\(.key)=\(.value)"] | join(" ")) | \([$e[] | select(.key | test($re) | not) | .value] | add // 0) \([$e[] | select(.key | test($re) | not) | "\(.key)=\(.value)"] | join(" ")) | \(.resumes | to_entries | map("\(.key)=\(.value)") | join(" ")) |"
    ' "$OUT/$f.json"
  done
  echo
  echo "| process | RSS at start (KiB) | RSS at end (KiB) | crashes/restarts |"
  echo "|---|---|---|---|"
  for p in $procs; do echo "| $p | ${rss_start[$p]} | $(rss_kib "$p") | ${restarts[$p]} |"; done
  echo
  echo "Faults:"
  echo '```'
  cat "$OUT/chaos.log"
  echo '```'
} | tee "$OUT/summary.md"

for f in native watch; do
  v=$(jq '.violation_total' "$OUT/$f.json")
  other=$(jq --arg re "$explicit" '[.errors | to_entries[] | select(.key | test($re) | not) | .value] | add // 0' "$OUT/$f.json")
  if (( v > 0 || other > 0 )); then
    echo "SOAK FAILED: $f has $v violations and $other errors that are not explicit (see $OUT/$f.txt)" >&2
    status=1
  fi
done
(( status == 0 )) && echo "SOAK PASSED"
exit $status
