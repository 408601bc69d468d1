#!/usr/bin/env bash
# Lints what both binaries serve on /metrics with `promtool check metrics`, after real traffic:
# a tokenfan-generator and a tokenfan-edge that uses it start on free loopback ports, one
# stream runs through the edge (and is resumed once), then each /metrics is scraped and checked.
# Fails on any lint problem (missing HELP, bad suffix, non-base unit, ...).
#   scripts/check-metrics.sh [BIN_DIR]     (default: target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug}
scripts/install-deps.sh promtool:prometheus curl:curl

for b in tokenfan-generator tokenfan-edge; do
  [ -x "$bin/$b" ] || { echo "check-metrics: $bin/$b missing (cargo build first)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Prints the value of JSON log field $2 from the first line of log $1 whose message is $3,
# waiting up to 30 s for it.
log_field() {
  local log=$1 field=$2 message=$3
  for _ in $(seq 300); do
    local line
    line=$(grep -F "\"message\":\"$message\"" "$log" | head -n1 || true)
    if [ -n "$line" ]; then
      sed -E "s/.*\"$field\":\"([^\"]*)\".*/\1/" <<<"$line"
      return 0
    fi
    sleep 0.1
  done
  echo "check-metrics: no \"$message\" in $log:" >&2
  cat "$log" >&2
  return 1
}

"$bin/tokenfan-generator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --log-format json >"$work/generator.log" 2>&1 &
pids+=($!)
grpc=$(log_field "$work/generator.log" grpc "tokenfan-generator listening")
gen_metrics=$(log_field "$work/generator.log" metrics "tokenfan-generator listening")

"$bin/tokenfan-edge" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --generator "http://$grpc" \
  --log-format json >"$work/edge.log" 2>&1 &
pids+=($!)
edge=$(log_field "$work/edge.log" addr "tokenfan-edge listening")
edge_admin=$(log_field "$work/edge.log" admin_addr "tokenfan-edge listening")

# One stream, read live over POST-SSE, then resumed from seq 2 over GET …/events.
curl -sSf -N --max-time 30 -D "$work/headers" -o "$work/stream" \
  -H 'accept: text/event-stream' -H 'content-type: application/json' \
  -d '{"prompt":"metrics","max_tokens":16,"timing":{"ttft_ms":5,"inter_token_ms":5}}' \
  "http://$edge/v1/streams"
grep -q '^event: done' "$work/stream" || { echo "check-metrics: the stream did not finish" >&2; exit 1; }
id=$(tr -d '\r' <"$work/headers" | sed -n 's/^x-stream-id: //Ip')
curl -sSf --max-time 30 -o /dev/null -H 'last-event-id: 2' "http://$edge/v1/streams/$id/events"

status=0
for target in "edge http://$edge_admin/metrics" "generator http://$gen_metrics/metrics"; do
  name=${target%% *}
  url=${target#* }
  curl -sSf --max-time 10 "$url" >"$work/$name.prom"
  if ! grep -q '^tokenfan_' "$work/$name.prom"; then
    echo "check-metrics: $name exports no tokenfan_ series" >&2
    status=1
    continue
  fi
  # promtool prints one line per problem (and exits non-zero); any output fails the check.
  if out=$(promtool check metrics <"$work/$name.prom" 2>&1) && [ -z "$out" ]; then
    echo "check-metrics: $name /metrics ($(grep -c '^tokenfan_' "$work/$name.prom") samples): ok"
  else
    echo "check-metrics: $name /metrics fails promtool check metrics:" >&2
    echo "$out" >&2
    status=1
  fi
done
grep -q '^tokenfan_edge_streams_total{outcome="done"} 1$' "$work/edge.prom" || {
  echo "check-metrics: the edge did not count the stream" >&2
  status=1
}
exit $status
