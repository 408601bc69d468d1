#!/usr/bin/env bash
# Per-token cost of the edge in figures that do not depend on CPU contention (see
# docs/benchmarks.md, "Edge per-token path"): instructions (callgrind), syscalls (strace -c)
# and heap allocations (dhat) per token delivered, over a fixed workload of N POST-SSE streams
# (MAX_TOKENS tokens each, CONC at a time, one curl per stream) against a fresh release edge
# with the embedded generator.
#
#   scripts/per-token-profile.sh callgrind 100 out/   # counters zeroed once the edge is up
#   scripts/per-token-profile.sh strace 40 out/ ; scripts/per-token-profile.sh strace 100 out/
#   scripts/per-token-profile.sh dhat 40 out/   ; scripts/per-token-profile.sh dhat 100 out/
#
# strace and dhat count from process start, so take two runs (40 and 100 streams) and divide
# the difference by the difference in tokens: start-up and shutdown cancel out. Prints the
# tokens delivered (every `event: token` line the clients received). LOG_FILTER (default warn)
# is the edge's --log-filter: `warn,tokenfan_edge=info` turns the stream spans on.
set -u
TOOL=$1 N=$2 OUT=$3
BIN=${BIN:-target/release/tokenfan-edge}
CONC=${CONC:-10}
MAX_TOKENS=${MAX_TOKENS:-50}
TTFT_MS=${TTFT_MS:-5}
INTER_TOKEN_MS=${INTER_TOKEN_MS:-20}
LOG_FILTER=${LOG_FILTER:-warn}
mkdir -p "$OUT"
PORT=$((20000 + RANDOM % 20000))
case $TOOL in
  callgrind) PRE=(valgrind --tool=callgrind "--callgrind-out-file=$OUT/cg.$N.out") ;;
  dhat) PRE=(valgrind --tool=dhat "--dhat-out-file=$OUT/dh.$N.json") ;;
  strace) PRE=(strace -c -f -o "$OUT/st.$N.txt") ;;
  none) PRE=() ;;
  *) echo "tool: callgrind, dhat, strace or none" >&2; exit 2 ;;
esac
"${PRE[@]}" "$BIN" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + 1))" \
  --log-filter "$LOG_FILTER" --shutdown-grace-secs 1 >"$OUT/edge.$TOOL.$N.log" 2>&1 &
PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" >/dev/null && break
  sleep 0.2
done
[ "$TOOL" = callgrind ] && callgrind_control -z "$PID" >/dev/null
body='{"prompt":"bench {}","max_tokens":'$MAX_TOKENS',"seed":{},"timing":{"ttft_ms":'$TTFT_MS',"inter_token_ms":'$INTER_TOKEN_MS'}}'
seq 1 "$N" | xargs -P "$CONC" -I{} sh -c "curl -sN --max-time 120 -X POST \
  http://127.0.0.1:$PORT/v1/streams -H 'content-type: application/json' \
  -H 'accept: text/event-stream' -d '$body' | grep -c '^event: token'" >"$OUT/tokens.$TOOL.$N.txt"
TOKENS=$(paste -sd+ "$OUT/tokens.$TOOL.$N.txt" | bc)
if [ "$TOOL" = strace ]; then
  # Stop the edge itself; strace then writes its summary and exits.
  kill -TERM "$(pgrep -P "$PID")"
else
  kill -TERM "$PID"
fi
wait "$PID"
echo "tool=$TOOL streams=$N tokens=$TOKENS"
