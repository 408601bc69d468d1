#!/usr/bin/env bash
# The local cluster on loopback: nats-server, redis-server, 2 generators, 3 edges and nginx.
#   scripts/cluster.sh up     start everything (installs missing Debian packages, builds release)
#   scripts/cluster.sh down   stop everything
#   scripts/cluster.sh status show what runs
#   scripts/cluster.sh kill NAME     kill -9 one process (edge-2, generator-1, nats, redis, …)
#   scripts/cluster.sh start NAME    start it again with the same command, and wait until ready
# Ports: nginx 8080 (the entry point), edges 8081-8083 (admin: /metrics, /readyz on
# 9481-9483), generators 15061-15062 (metrics 9471-9472), NATS 14222, Redis 16379: all below
# the kernel's ephemeral range (32768-60999 by default), where outgoing connections take their
# local ports. `up` checks every one is free first and says which is taken and by what.
# Logs and pid files: .run/cluster/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run="$root/.run/cluster"
bin="$root/target/release"
NATS_PORT=14222
REDIS_PORT=16379
GENERATOR_PORT_BASE=1506 # generator-1 on 15061, generator-2 on 15062
PORTS="8080 8081 8082 8083 9481 9482 9483 ${GENERATOR_PORT_BASE}1 ${GENERATOR_PORT_BASE}2 9471 9472 $NATS_PORT $REDIS_PORT"

start() { # name, command...
  local name=$1
  shift
  "$@" >>"$run/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
}

wait_http() { # url, name
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not become ready at $1; see $run/$2.log" >&2
  return 1
}

wait_port() { # port, name
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 is not listening on $1; see $run/$2.log" >&2
  return 1
}

up() {
  "$root/scripts/install-deps.sh" nats-server:nats-server redis-server:redis-server \
    nginx:nginx curl:curl
  (cd "$root" && cargo build --release --locked --bins)
  if [ -d "$run" ] && ls "$run"/*.pid >/dev/null 2>&1; then down; fi
  check_ports
  mkdir -p "$run/nginx-tmp" "$run/redis"
  rm -f "$run"/*.log

  launch nats
  launch redis
  for i in 1 2; do launch "generator-$i"; done
  for i in 1 2 3; do launch "edge-$i"; done

  sed "s|@RUN_DIR@|$run|g" "$root/deploy/nginx-local.conf" >"$run/nginx.conf"
  start nginx nginx -p "$run" -c "$run/nginx.conf" -g 'daemon off;'
  wait_http http://127.0.0.1:8080/healthz nginx
  echo "tokenfan cluster up: http://127.0.0.1:8080/ (edges 8081-8083; logs in $run)"
}

# Fails, naming the port and its holder, when any port of the topology is in use.
check_ports() {
  local port holder taken=0
  for port in $PORTS; do
    holder=$(ss -Htanp exclude time-wait "( sport = :$port )" 2>/dev/null | head -n 1)
    [ -n "$holder" ] || continue
    taken=1
    echo "port $port is taken: $holder" >&2
  done
  if [ "$taken" = 1 ]; then
    echo "cluster-up needs the ports above; stop what holds them (make cluster-down if it is an earlier cluster)" >&2
    return 1
  fi
}

# Starts one process of the topology by name and waits until it is ready.
launch() {
  case "$1" in
    nats)
      start nats nats-server -a 127.0.0.1 -p $NATS_PORT
      wait_port $NATS_PORT nats
      ;;
    redis)
      start redis redis-server --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no \
        --dir "$run/redis"
      wait_port $REDIS_PORT redis
      ;;
    generator-[12])
      local i=${1#generator-}
      start "$1" "$bin/tokenfan-generator" --listen "127.0.0.1:$GENERATOR_PORT_BASE$i" \
        --metrics-listen "127.0.0.1:947$i" --allow-faults
      wait_http "http://127.0.0.1:947$i/metrics" "$1"
      ;;
    edge-[123])
      local i=${1#edge-}
      start "$1" "$bin/tokenfan-edge" --listen "127.0.0.1:808$i" --replica-id "$1" \
        --admin-listen "127.0.0.1:948$i" \
        --generator "http://127.0.0.1:${GENERATOR_PORT_BASE}1,http://127.0.0.1:${GENERATOR_PORT_BASE}2" \
        --nats-url "nats://127.0.0.1:$NATS_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT"
      wait_http "http://127.0.0.1:948$i/readyz" "$1"
      ;;
    *) echo "unknown process $1 (nats, redis, generator-1..2, edge-1..3)" >&2; return 2 ;;
  esac
}

# kill -9 one process by name (a crash, not a shutdown).
crash() {
  local pid
  pid=$(cat "$run/$1.pid" 2>/dev/null || true)
  [ -n "$pid" ] || { echo "no pid file for $1" >&2; return 1; }
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$run/$1.pid"
}

down() {
  [ -d "$run" ] || return 0
  for pidfile in "$run"/*.pid; do
    [ -e "$pidfile" ] || continue
    [ "$(basename "$pidfile")" = nginx.pid ] && [ ! -s "$pidfile" ] && continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  echo "tokenfan cluster down"
}

status() {
  for pidfile in "$run"/*.pid; do
    [ -e "$pidfile" ] || { echo "not running"; return 0; }
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then state=running; else state=dead; fi
    printf '%-12s %-8s %s\n' "$(basename "$pidfile" .pid)" "$pid" "$state"
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kill) crash "${2:?name}" ;;
  start) mkdir -p "$run/redis"; launch "${2:?name}" ;;
  *) echo "usage: $0 up|down|status|kill NAME|start NAME" >&2; exit 2 ;;
esac
