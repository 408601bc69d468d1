#!/usr/bin/env bash
# Collects the results of a horizontal load test and merges them into one exact report.
#
#   scripts/loadtest-collect.sh OUT LOG...
#
# Each LOG is the log of one load generator pod of k8s/loadtest (kubectl logs POD > LOG): the
# pod prints its --json result, gzip + base64, between the lines
#   ----- BEGIN TOKENFAN-LOADGEN RESULT index=I status=S -----
#   ----- END TOKENFAN-LOADGEN RESULT -----
# It is decoded to OUT/pod-I.json. Then `tokenfan-loadgen merge` writes OUT/merged.json (counters
# summed, percentiles from the merged histograms), OUT/merged.txt (the text report) and
# OUT/merged.svg (the latency chart). Exit status: the merge's (0 clean, 1 errors or
# violations counted, 2 no result or results that do not merge).
#
# LOADGEN names the tokenfan-loadgen binary (default: on PATH, else target/release/, built if
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT LOG..." >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out"

loadgen=${LOADGEN:-}
if [[ -z "$loadgen" ]]; then
  if command -v tokenfan-loadgen >/dev/null; then
    loadgen=tokenfan-loadgen
  else
    loadgen=target/release/tokenfan-loadgen
    [[ -x "$loadgen" ]] || cargo build --release --locked -p tokenfan-loadgen
  fi
fi

found=0
for log in "$@"; do
  # One result per log; a pod that printed none (exit 2: the run could not be made) is named.
  header=$(grep -m1 -- '^----- BEGIN TOKENFAN-LOADGEN RESULT' "$log" || true)
  if [[ -z "$header" ]]; then
    echo "no result in $log (the pod's run could not be made?); last lines:" >&2
    tail -n 5 "$log" | sed 's/^/    /' >&2
    continue
  fi
  index=$(sed -n 's/.*index=\([0-9]*\).*/\1/p' <<<"$header")
  status=$(sed -n 's/.*status=\([0-9]*\).*/\1/p' <<<"$header")
  sed -n '/^----- BEGIN TOKENFAN-LOADGEN RESULT/,/^----- END TOKENFAN-LOADGEN RESULT/p' "$log" \
    | sed '1d;$d' | base64 -d | gunzip >"$out/pod-$index.json"
  echo "pod $index: exit status $status, result in $out/pod-$index.json" >&2
  found=$((found + 1))
done
if [[ "$found" -eq 0 ]]; then
  echo "no results found" >&2
  exit 2
fi
if [[ "$found" -ne $# ]]; then
  echo "warning: $found results from $# logs; the merged report covers only those" >&2
fi

status=0
"$loadgen" merge "$out"/pod-*.json --json "$out/merged.json" | tee "$out/merged.txt" || status=$?
if [[ -s "$out/merged.json" ]]; then
  "$loadgen" chart --out "$out/merged.svg" --title "tokenfan: horizontal load test" \
    "$out/merged.json" >&2 || true
fi
echo "merged report: $out/merged.json, $out/merged.txt, $out/merged.svg" >&2
exit "$status"
