#!/usr/bin/env bash
# Counts for the capacity model (docs/capacity.md): Redis commands and NATS messages per stream
# and per token under a small loadgen run against a local 2-edge cluster (NATS with its
# monitoring port, Redis, one generator, two edges, all on free loopback ports, stopped at the
# end). Counts, not speeds: they hold on a busy machine; CPU figures from here do not.
#
#   scripts/capacity-counts.sh                         # debug binaries from target/debug
#   PROFILE=release STREAMS=100 scripts/capacity-counts.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-debug}
STREAMS=${STREAMS:-50}           # concurrent streams (closed loop)
VIEWERS=${VIEWERS:-2}            # watch run: viewers per stream, round-robin over both edges
MAX_TOKENS=${MAX_TOKENS:-100}
MEASURE_SECS=${MEASURE_SECS:-10}
bin=target/$PROFILE
for b in tokenfan-edge tokenfan-generator tokenfan-loadgen; do
  [[ -x "$bin/$b" ]] || { echo "missing $bin/$b: cargo build${PROFILE/debug/} first" >&2; exit 2; }
done

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

nats_port=$(port); nats_mon=$(port); redis_port=$(port); gen_port=$(port)
nats-server -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" >"$dir/nats.log" 2>&1 & pids+=($!)
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 & pids+=($!)
"$bin/tokenfan-generator" --listen "127.0.0.1:$gen_port" --metrics-listen 127.0.0.1:0 >"$dir/gen.log" 2>&1 & pids+=($!)
edges=()
for i in 1 2; do
  p=$(port)
  "$bin/tokenfan-edge" --listen "127.0.0.1:$p" --replica-id "edge-$i" \
    --nats-url "nats://127.0.0.1:$nats_port" --redis-url "redis://127.0.0.1:$redis_port" \
    --generator "http://127.0.0.1:$gen_port" >"$dir/edge-$i.log" 2>&1 & pids+=($!)
  edges+=("http://127.0.0.1:$p")
done
for e in "${edges[@]}"; do
  for _ in $(seq 100); do curl -fs "$e/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fs "$e/readyz" >/dev/null || { echo "edge $e not ready" >&2; cat "$dir"/edge-*.log >&2; exit 1; }
done
targets=$(IFS=,; echo "${edges[*]}")

varz() { curl -fs "http://127.0.0.1:$nats_mon/varz" | python3 -c "import json,sys; v=json.load(sys.stdin); print(v['in_msgs'], v['out_msgs'], v['in_bytes'], v['out_bytes'])"; }
usedmem() { redis-cli -p "$redis_port" info memory | tr -d '\r' | sed -n 's/^used_memory://p'; }
cmdstats() { redis-cli -p "$redis_port" info commandstats | tr -d '\r' | grep '^cmdstat' | sed 's/^cmdstat_//; s/:calls=/ /; s/,.*//'; }

run() { # name, loadgen args...
  local name=$1; shift
  redis-cli -p "$redis_port" config resetstat >/dev/null
  local mem_before; mem_before=$(usedmem)
  local before; before=$(varz)
  "$bin/tokenfan-loadgen" "$@" --target "$targets" --concurrency "$STREAMS" \
    --max-tokens "$MAX_TOKENS" --ramp 2 --warmup 1 --duration "$MEASURE_SECS" -q \
    --json "$dir/$name.json" >"$dir/$name.txt" || { cat "$dir/$name.txt" >&2; exit 1; }
  local after; after=$(varz)
  echo "redis used_memory grew by $(( $(usedmem) - mem_before )) bytes; keys now $(redis-cli -p "$redis_port" dbsize)"
  python3 - "$dir/$name.json" "$name" "$before" "$after" <<'EOF' "$(cmdstats)"
import json, sys
path, name, before, after, stats = sys.argv[1:6]
r = json.load(open(path))
def find(d, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d: return d[k]
    return None
total = r.get("total") or r
streams = find(r, "streams_completed", "completed_streams")
print(f"== {name}")
print("loadgen summary keys:", ", ".join(sorted(k for k in r if not isinstance(r[k], (dict, list)))))
b = list(map(int, before.split())); a = list(map(int, after.split()))
print(f"nats in_msgs {a[0]-b[0]}  out_msgs {a[1]-b[1]}  in_bytes {a[2]-b[2]}  out_bytes {a[3]-b[3]}")
print("redis commands:", " ".join(stats.split("\n")))
EOF
  grep -iE "streams|tokens|errors|violations" "$dir/$name.txt" | head -12
}

run native native
run watch watch --viewers "$VIEWERS"
echo "edge metrics (edge-1):"
curl -fs "${edges[0]}/metrics" | grep -E '^tokenfan_edge_(streams|events_delivered|bus|backend)' | head -20
