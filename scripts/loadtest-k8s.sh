#!/usr/bin/env bash
# A horizontal load test on Kubernetes: runs the Indexed Job of k8s/loadtest (N tokenfan-loadgen
# pods against the tokenfan-edge Service, each with its own seeds, all measuring the same
# window), waits for it, collects every pod's result from its log and merges them into one
# exact report (scripts/loadtest-collect.sh).
#
#   scripts/loadtest-k8s.sh [OVERLAY]          # default k8s/loadtest/overlays/dev
#   LEAD_SECS=120 scripts/loadtest-k8s.sh k8s/loadtest/overlays/prod
#   COLLECT_ONLY=1 scripts/loadtest-k8s.sh k8s/loadtest/overlays/prod   # the Job already ran
#
# LEAD_SECS (default 60): from now to --start-at, time for every pod to be scheduled, pull the
# image and connect; a pod that starts after the measured window has begun refuses to run.
# OUT (default target/loadtest/<UTC time>): where the results go. KUBECTL (kubectl).
# The cluster's node clocks must be synchronised (NTP): --start-at is wall-clock time.
set -euo pipefail
cd "$(dirname "$0")/.."

overlay=${1:-k8s/loadtest/overlays/dev}
kubectl=${KUBECTL:-kubectl}
lead=${LEAD_SECS:-60}
out=${OUT:-target/loadtest/$(date -u +%Y%m%dT%H%M%SZ)}
job=tokenfan-loadtest
mkdir -p "$out"

rendered="$out/job.yaml"
$kubectl kustomize "$overlay" >"$rendered.in"
ns=$(awk '/^kind: Job/{j=1} j && /^  namespace:/{print $2; exit}' "$rendered.in")
ns=${ns:-default}
completions=$(awk '/^kind: Job/{j=1} j && /^  completions:/{print $2; exit}' "$rendered.in")
window=$(awk -F': ' '
  /TOKENFAN_LOADGEN_(RAMP|WARMUP|DURATION):/ {gsub(/"/, "", $2); s += $2}
  END {print int(s + 0.5)}' "$rendered.in")

if [[ "${COLLECT_ONLY:-0}" != 1 ]]; then
  start_at=$(($(date +%s) + lead))
  sed "s|TOKENFAN_LOADGEN_START_AT: .*|TOKENFAN_LOADGEN_START_AT: \"$start_at\"|" \
    "$rendered.in" >"$rendered"
  echo "== $completions load generator pods in namespace $ns, start at $(date -u -d "@$start_at" +%FT%TZ)" >&2
  $kubectl -n "$ns" delete job "$job" --ignore-not-found --wait=true
  $kubectl apply -f "$rendered"
  # Done when every pod has ended: the lead, the ramp, warm-up and window, then the streams
  # in flight read to their end (bounded by the pods' stream timeout) and some slack.
  deadline=$(($(date +%s) + lead + window + 900))
  while :; do
    read -r succeeded failed < <($kubectl -n "$ns" get job "$job" \
      -o jsonpath='{.status.succeeded} {.status.failed}{"\n"}' | awk '{print $1+0, $2+0}')
    if ((succeeded + failed >= completions)); then
      break
    fi
    if (($(date +%s) > deadline)); then
      echo "timeout waiting for job/$job ($succeeded succeeded, $failed failed)" >&2
      break
    fi
    sleep 5
  done
fi

logs=()
for pod in $($kubectl -n "$ns" get pods -l "job-name=$job" -o name); do
  log="$out/$(basename "$pod").log"
  $kubectl -n "$ns" logs "$pod" >"$log" || true
  logs+=("$log")
done
if [[ ${#logs[@]} -eq 0 ]]; then
  echo "no pods of job/$job in namespace $ns" >&2
  exit 2
fi
exec scripts/loadtest-collect.sh "$out" "${logs[@]}"
