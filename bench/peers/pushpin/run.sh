#!/usr/bin/env bash
# Starts the Pushpin fan-out peer: the origin/publisher (origin.js, Node) and Pushpin in front of
# it, both on loopback, with a generated configuration under a fresh run directory. Prints
# "listening on http://127.0.0.1:PORT" (Pushpin's client port: create, view and poll streams
# there) once a request through Pushpin reaches the origin. SIGTERM/SIGINT stops both.
#
#   bench/peers/pushpin/run.sh
#
# Environment: PUSHPIN_HTTP_PORT (27999), PUSHPIN_PORT_OFFSET (20000: Pushpin's internal ports
# 5560-5563 become 25560-25563), PUSHPIN_LOG_LEVEL (1 = warnings; 2 logs every request),
# PUSHPIN_RUNDIR (default: a new directory under $TMPDIR, removed at exit), PUSHPIN_LOG_DIR (copy
# Pushpin's log, the origin's stderr and the configuration there at exit), PUSHPIN_RELIABLE_SSE
# (1 = SSE holds with prev-id and a recovery link; see origin.js).
# Needs `pushpin` (Debian package; scripts/install-deps.sh pushpin:pushpin) and `node`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

http_port=${PUSHPIN_HTTP_PORT:-27999}
offset=${PUSHPIN_PORT_OFFSET:-20000}
log_level=${PUSHPIN_LOG_LEVEL:-1}
own_rundir=0
if [[ -z "${PUSHPIN_RUNDIR:-}" ]]; then
  PUSHPIN_RUNDIR=$(mktemp -d "${TMPDIR:-/tmp}/tokenfan-pushpin.XXXXXX")
  own_rundir=1
fi
rundir=$PUSHPIN_RUNDIR
mkdir -p "$rundir/log"
publish_url="http://127.0.0.1:$((5561 + offset))/publish/"

command -v pushpin >/dev/null || { echo "pushpin is not installed (scripts/install-deps.sh pushpin:pushpin)" >&2; exit 1; }
for p in "$http_port" $((5560 + offset)) $((5561 + offset)) $((5562 + offset)) $((5563 + offset)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is already in use (set PUSHPIN_HTTP_PORT / PUSHPIN_PORT_OFFSET)" >&2
    exit 1
  fi
done

origin_pid=
pushpin_pid=
stop() {
  local pid
  for pid in $pushpin_pid $origin_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $pushpin_pid $origin_pid; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -s "$rundir/origin.err" ]]; then
    tail -n 5 "$rundir/origin.err" >&2
  fi
  if [[ -n "${PUSHPIN_LOG_DIR:-}" ]]; then
    mkdir -p "$PUSHPIN_LOG_DIR"
    cp "$rundir/pushpin.log" "$rundir/origin.err" "$rundir/pushpin.conf" "$PUSHPIN_LOG_DIR/" 2>/dev/null || true
  fi
  if [[ "$own_rundir" == 1 ]]; then rm -rf "$rundir"; fi
}
trap stop EXIT
trap 'exit 0' TERM INT

node "$here/origin.js" --listen 127.0.0.1:0 --publish "$publish_url" >"$rundir/origin.out" 2>"$rundir/origin.err" &
origin_pid=$!
origin_addr=
for _ in $(seq 100); do
  origin_addr=$(sed -n 's#^listening on http://##p' "$rundir/origin.out" | head -n1)
  [[ -n "$origin_addr" ]] && break
  kill -0 "$origin_pid" 2>/dev/null || { cat "$rundir/origin.err" >&2; echo "the origin exited" >&2; exit 1; }
  sleep 0.05
done
[[ -n "$origin_addr" ]] || { echo "the origin did not start" >&2; exit 1; }

sed -e "s#@RUNDIR@#$rundir#g" -e "s#@HTTP_PORT@#$http_port#g" -e "s#@PORT_OFFSET@#$offset#g" \
  -e "s#@LOG_LEVEL@#$log_level#g" "$here/pushpin.conf.in" >"$rundir/pushpin.conf"
echo "* $origin_addr" >"$rundir/routes"

pushpin --config "$rundir/pushpin.conf" --merge-output >"$rundir/pushpin.log" 2>&1 &
pushpin_pid=$!
for _ in $(seq 200); do
  if [[ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$http_port/healthz" || true)" == 200 ]]; then
    echo "listening on http://127.0.0.1:$http_port"
    echo "# origin $origin_addr (pid $origin_pid), pushpin pid $pushpin_pid, publish $publish_url, run dir $rundir"
    wait "$pushpin_pid" || true
    echo "pushpin exited:" >&2
    tail -n 20 "$rundir/pushpin.log" >&2
    exit 1
  fi
  kill -0 "$pushpin_pid" 2>/dev/null || break
  sleep 0.1
done
cat "$rundir/pushpin.log" >&2
echo "pushpin did not start" >&2
exit 1
