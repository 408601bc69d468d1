#!/usr/bin/env bash
# The deployment run for real: builds the tokenfan image from deploy/Dockerfile and starts the
# topology of deploy/compose.yaml with podman, then drives it through its nginx.
#   scripts/compose-smoke.sh        (make compose-smoke; .ci/run runs it after make test)
#
# 1. Installs podman, runc, mmdebstrap, the dnsname CNI plugin and docker-compose 1.29 from
#    Debian when missing, and makes local stand-ins for the public images no registry serves
#    here (each made once, then reused): the Dockerfile's build base (Debian + gcc + the Rust
#    toolchain of this machine) and runtime base (Debian minbase), and nats, redis, nginx and
#    prometheus images from their Debian packages.
# 2. Builds the real deploy/Dockerfile with those bases (build args) and reports the image size.
# 3. Starts the compose topology (3 NATS nodes, Redis, 2 generators, 3 edges, nginx,
#    Prometheus; the `observability` profile with the collector, Tempo and Grafana stays off)
#    through podman's Docker API socket, and waits until every container is healthy.
# 4. Through nginx (published on a free loopback port): an OpenAI stream; a native stream read
#    on another edge and resumed with Last-Event-ID; a stop sent to a third edge; `podman kill`
#    of the edge that owns a stream while a client reads it through nginx; `podman stop` of an
#    edge that owns streams in flight (it drains, they finish elsewhere); Prometheus scraped
#    every edge and generator. Every stream read is checked: seqs in order, none lost, none
#    twice, one terminal event, text equal to the stored history.
# 5. Checks the image as scanners do: non-root user, read-only root filesystem, no compiler,
#    no package cache, healthcheck passes.
# 6. Tears everything down on exit, failure included (containers, network, volumes, the API
#    service). The images stay, so the next run only rebuilds what changed.
#
# Traffic: loopback, and the containers this script creates on its own podman network.
# Facts of this machine kind (not of users' machines), handled here: crun fails (cgroups hybrid
# mode), so runc; podman's default ulimits are refused, so explicit ones (containers.conf given
# through CONTAINERS_CONF); no systemd, so podman runs no healthcheck timers and this script
# runs the healthchecks itself (`podman healthcheck run`) at the compose interval.
#
# Environment: COMPOSE_SMOKE_KEEP=1 leaves the topology running at the end, failure included
# (then `scripts/compose-smoke.sh down`); EDGE_ADMIN_PORT is the edge port Prometheus scrapes and
# /readyz is asked on (the admin listener, 9465).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
state="$root/.run/compose-smoke"
mkdir -p "$state"

PROJECT=tokenfan-smoke
RUST_VERSION=$(sed -n 's/^ARG RUST_VERSION=//p' deploy/Dockerfile)
DEBIAN_RELEASE=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' deploy/Dockerfile)
# Bump when the recipe of a stand-in image changes, so it is made again.
STANDIN_REV=2
REG=localhost/tokenfan-smoke
BUILD_IMAGE="$REG/rust:$RUST_VERSION-$DEBIAN_RELEASE-r$STANDIN_REV"
RUNTIME_IMAGE="$REG/debian:$DEBIAN_RELEASE-slim-r$STANDIN_REV"
SERVICES_IMAGE="$REG/services:$DEBIAN_RELEASE-r$STANDIN_REV"
TOKENFAN_IMAGE="$REG/tokenfan:0.1.0"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Every image made here carries it (the stand-ins set it, images built on them inherit it), so
# the script can clean up its own images and none else.
LABEL=io.tokenfan.compose-smoke=1
EDGE_ADMIN_PORT=${EDGE_ADMIN_PORT:-9465}

export CONTAINERS_CONF="$state/containers.conf"
export DOCKER_HOST="unix://$state/podman.sock"
compose=(docker-compose -p "$PROJECT" -f deploy/compose.yaml -f "$state/compose.override.yaml")

t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }
die() {
  echo "compose-smoke: FAIL: $*" >&2
  exit 1
}

# ------------------------------------------------------------------ teardown
teardown() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ] && [ -S "$state/podman.sock" ]; then
    echo "---- container states and the last log lines of each (failure)"
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
      --format '{{.Names}} {{.Status}}' 2>/dev/null
    for c in $(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
      echo "-- $(podman inspect --format '{{.Name}}' "$c")"
      podman logs --tail 15 "$c" 2>&1 | cut -c1-300
    done
  fi
  if [ "${COMPOSE_SMOKE_KEEP:-0}" = 1 ] && [ -n "${HTTP_PORT:-}" ]; then
    echo "compose-smoke: left running (nginx on 127.0.0.1:$HTTP_PORT, Prometheus on" \
      "127.0.0.1:$PROMETHEUS_PORT); stop with: $0 down"
    return
  fi
  down
  [ "$rc" -eq 0 ] || echo "compose-smoke: failed after $((SECONDS - t0))s" >&2
}

down() {
  if [ -f "$state/ticker.pid" ]; then
    kill "$(cat "$state/ticker.pid")" 2>/dev/null
    rm -f "$state/ticker.pid"
  fi
  if [ -S "$state/podman.sock" ] && [ -f "$state/compose.override.yaml" ]; then
    "${compose[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  fi
  # Whatever compose left (it does not know about a container it failed to create).
  local left
  left=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null || true)
  [ -n "$left" ] && podman rm -f -t 0 $left >/dev/null 2>&1
  podman volume rm -f "${PROJECT}_loadtest-results" >/dev/null 2>&1 || true
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  if [ -f "$state/service.pid" ]; then
    kill "$(cat "$state/service.pid")" 2>/dev/null || true
    rm -f "$state/service.pid" "$state/podman.sock"
  fi
}

if [ "${1:-}" = down ]; then
  down
  exit 0
fi

# ------------------------------------------------------------------ 1. tools and stand-ins
step "tools"
"$root/scripts/install-deps.sh" podman:podman runc:runc mmdebstrap:mmdebstrap \
  newuidmap:uidmap fuse-overlayfs:fuse-overlayfs \
  /usr/lib/cni/dnsname:golang-github-containernetworking-plugin-dnsname \
  docker-compose:docker-compose python3:python3 curl:curl

cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF

trap teardown EXIT
down # a run that was killed before its trap ran

has_image() { podman image exists "$1"; }

# mmdebstrap_image IMAGE PACKAGES [--change ...] -- [mmdebstrap hooks...]: a Debian
# $DEBIAN_RELEASE minbase root filesystem with PACKAGES, imported as IMAGE.
mmdebstrap_image() {
  local image=$1 packages=$2 tar log
  shift 2
  local changes=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    changes+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  tar="$state/$(echo "$image" | tr '/:' '__').tar"
  log="$tar.log"
  if ! mmdebstrap --variant=minbase --aptopt='APT::Install-Recommends "false"' \
    ${packages:+--include="$packages"} "$@" \
    "$DEBIAN_RELEASE" "$tar" "$DEBIAN_MIRROR" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    return 1
  fi
  podman import -q --change "LABEL $LABEL" "${changes[@]}" "$tar" "$image" >/dev/null
  rm -f "$tar"
}

# Stand-ins of an older recipe.
for img in $(podman images --filter "label=$LABEL" --format '{{.Repository}}:{{.Tag}}'); do
  case "$img" in *-r"$STANDIN_REV" | "$TOKENFAN_IMAGE" | "$REG/"*-base:* | "<none>:<none>") ;; *) podman rmi "$img" >/dev/null 2>&1 || true ;; esac
done

standins=()
if ! has_image "$RUNTIME_IMAGE"; then
  standins+=(runtime)
  mmdebstrap_image "$RUNTIME_IMAGE" "" --change 'CMD ["bash"]' &
fi

if ! has_image "$BUILD_IMAGE"; then
  standins+=(build)
  sysroot=$(rustc --print sysroot)
  have=$(rustc --version | awk '{print $2}')
  case "$have" in
    "$RUST_VERSION" | "$RUST_VERSION".*) ;;
    *) die "the Dockerfile builds with Rust $RUST_VERSION, this machine has rustc $have" ;;
  esac
  # The toolchain without its documentation (share/), where the rust image keeps it.
  mmdebstrap_image "$BUILD_IMAGE" "gcc,libc6-dev,ca-certificates" \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' -- \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" \"\$1/usr/local/cargo/bin\"" \
    --customize-hook="cp -a '$sysroot/bin' '$sysroot/lib' '$sysroot/libexec' '$sysroot/etc' \"\$1/usr/local/rust/\"" &
fi

if ! has_image "$SERVICES_IMAGE"; then
  standins+=(services)
  # docker-entrypoint.sh: what the official images do before their command; the official
  # redis image is built with protected mode off (no password, reached from other containers).
  entry="$state/docker-entrypoint.sh"
  cat >"$entry" <<'EOF'
#!/bin/sh
if [ "$1" = redis-server ]; then
  shift
  exec redis-server "$@" --protected-mode no
fi
exec "$@"
EOF
  mmdebstrap_image "$SERVICES_IMAGE" "nats-server,redis-server,nginx,prometheus,wget" -- \
    --customize-hook="install -m 0755 '$entry' \"\$1/usr/local/bin/docker-entrypoint.sh\"" \
    --customize-hook="mkdir -p \"\$1/data\" \"\$1/prometheus\" && chown 65534:65534 \"\$1/prometheus\"" &
fi

if [ ${#standins[@]} -gt 0 ]; then
  step "stand-in images: ${standins[*]} (mmdebstrap)"
  for job in $(jobs -p); do wait "$job" || die "a stand-in image could not be made (logs: $state/*.log)"; done
fi
# One Debian image, four entry points (like the official images' ENTRYPOINT/CMD/USER).
services_tag() { # name, podman import --change ...
  local name=$1
  shift
  local image="$REG/$name:$DEBIAN_RELEASE-r$STANDIN_REV"
  has_image "$image" && return 0
  printf 'FROM %s\n' "$SERVICES_IMAGE" >"$state/Containerfile.$name"
  printf '%s\n' "$@" >>"$state/Containerfile.$name"
  podman build -q --network none -t "$image" -f "$state/Containerfile.$name" "$state" >/dev/null
}
services_tag nats 'ENTRYPOINT ["nats-server"]'
services_tag redis 'WORKDIR /data' 'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
services_tag nginx 'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["nginx", "-g", "daemon off;"]' \
  'STOPSIGNAL SIGQUIT'
services_tag prometheus 'USER 65534' 'WORKDIR /prometheus' 'ENTRYPOINT ["prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'

# The crates of Cargo.lock, vendored into the build base: cargo inside the build then needs no
# network (crates.io is reached from here only through a TLS-intercepting proxy whose CA the
# containers do not trust). The public rust image fetches them into the cache mount instead.
lock_hash=$(sha256sum Cargo.lock | cut -c1-12)
CRATES_IMAGE="$REG/rust-crates:$RUST_VERSION-$lock_hash-r$STANDIN_REV"
if ! has_image "$CRATES_IMAGE"; then
  step "vendored crates of Cargo.lock ($lock_hash) on top of the build base"
  crates="$state/crates"
  rm -rf "$crates"
  mkdir -p "$crates"
  cargo vendor --locked -q "$crates/vendor" >/dev/null
  printf '%s\n' '[source.crates-io]' 'replace-with = "vendored-sources"' '' \
    '[source.vendored-sources]' 'directory = "/usr/local/cargo/vendor"' >"$crates/config.toml"
  printf 'FROM %s\nCOPY vendor /usr/local/cargo/vendor\nCOPY config.toml /usr/local/cargo/config.toml\n' \
    "$BUILD_IMAGE" >"$crates/Containerfile"
  podman build -q --network none -t "$CRATES_IMAGE" "$crates" >/dev/null
  rm -rf "$crates"
  # The crates of older lock files.
  for old in $(podman images --format '{{.Repository}}:{{.Tag}}' "$REG/rust-crates"); do
    [ "$old" = "$CRATES_IMAGE" ] || podman rmi "$old" >/dev/null 2>&1 || true
  done
fi

# ------------------------------------------------------------------ 2. the tokenfan image
# The Dockerfile takes the base images' repositories; their tags follow its versions.
podman tag "$CRATES_IMAGE" "$REG/build-base:$RUST_VERSION-$DEBIAN_RELEASE"
podman tag "$RUNTIME_IMAGE" "$REG/runtime-base:$DEBIAN_RELEASE-slim"
step "podman build -f deploy/Dockerfile (build base $CRATES_IMAGE)"
build_start=$SECONDS
# --network host: the runtime stage installs ca-certificates from Debian; the containers of
# the topology run on their own network.
# --format docker: the OCI image format has no HEALTHCHECK (podman drops it with a warning).
if ! podman build --network host --layers --format docker \
  --build-arg "BUILD_IMAGE=$REG/build-base" --build-arg "RUNTIME_IMAGE=$REG/runtime-base" \
  -f deploy/Dockerfile -t "$TOKENFAN_IMAGE" . >"$state/build.log" 2>&1; then
  tail -n 40 "$state/build.log" >&2
  die "podman build failed (full log: $state/build.log)"
fi
# The build stage's image of the previous build, now untagged.
podman image prune -f --filter "label=$LABEL" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$TOKENFAN_IMAGE")
echo "image $TOKENFAN_IMAGE: $((size / 1000000)) MB ($size bytes), built in $((SECONDS - build_start))s"

# ------------------------------------------------------------------ 5. the image as scanners see it
step "image checks: non-root, read-only root filesystem, no compiler, no package cache"
user=$(podman image inspect --format '{{.Config.User}}' "$TOKENFAN_IMAGE")
case "$user" in "" | 0 | 0:* | root | root:*) die "the image runs as root (USER '$user')" ;; esac
[ "$(podman run --rm "$TOKENFAN_IMAGE" id -u)" != 0 ] || die "id -u is 0 in the image"
found=$(podman run --rm --entrypoint bash "$TOKENFAN_IMAGE" -c '
  for c in cc gcc g++ clang rustc cargo make; do command -v "$c"; done
  ls /var/cache/apt/archives/*.deb /var/lib/apt/lists/*_Packages* 2>/dev/null
  ls -d /usr/local/cargo /usr/local/rustup /root/.cargo 2>/dev/null
  true')
[ -z "$found" ] || die "the image holds a compiler, toolchain or package cache: $found"
# Read-only root filesystem with no writable path at all (not even podman's default /tmp
# tmpfs), as the Kubernetes manifests run it: the edge serves and its healthcheck passes; same
# for the generator.
ro_check() { # name, command...
  local name=$1
  shift
  # (podman complains on stderr that it cannot schedule the healthcheck: no systemd; this
  # script runs it.)
  podman run -d --name "$PROJECT-ro-$name" --read-only --read-only-tmpfs=false --network none \
    --label "com.docker.compose.project=$PROJECT" "$TOKENFAN_IMAGE" "$@" >/dev/null 2>"$state/run.err" ||
    die "podman run $name: $(cat "$state/run.err")"
  local ok=""
  for _ in $(seq 1 100); do
    if podman healthcheck run "$PROJECT-ro-$name" >/dev/null 2>&1; then ok=1; break; fi
    [ "$(podman inspect --format '{{.State.Running}}' "$PROJECT-ro-$name")" = true ] || break
    sleep 0.2
  done
  if [ -z "$ok" ]; then
    podman logs "$PROJECT-ro-$name" 2>&1 | tail -n 20 >&2
    die "$name with a read-only root filesystem: the healthcheck did not pass"
  fi
  podman rm -f -t 5 "$PROJECT-ro-$name" >/dev/null 2>&1
  echo "ok    $name runs as uid $(podman image inspect --format '{{.Config.User}}' "$TOKENFAN_IMAGE") with a read-only root filesystem; healthcheck passes"
}
ro_check edge tokenfan-edge
ro_check generator tokenfan-generator

# ------------------------------------------------------------------ 3. the topology
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port)
export TOKENFAN_HTTP_PORT=$HTTP_PORT TOKENFAN_PROMETHEUS_PORT=$PROMETHEUS_PORT

# nginx: Debian's 1.22 lacks `server … resolve` (nginx >= 1.27.3), and podman's DNS is not
# Docker's 127.0.0.11; the rest of deploy/nginx.conf is used as it is, plus a test-only header
# (X-Smoke-Edge: edge-N) that pins a request to one edge, so the smoke can say which edge
# serves what. Requests without it go through the real balancer.
sed -e 's/ resolve max_fails/ max_fails/' -e '/^\s*resolver /d' deploy/nginx.conf >"$state/nginx.conf"
grep -q ' resolve ' "$state/nginx.conf" && die "deploy/nginx.conf changed: update the smoke's copy"
python3 - "$state/nginx.conf" <<'PY'
import sys
path = sys.argv[1]
conf = open(path).read()
pins = """
    # compose-smoke only: X-Smoke-Edge pins a request to one edge.
    upstream smoke_edge_1 { server edge-1:8080; }
    upstream smoke_edge_2 { server edge-2:8080; }
    upstream smoke_edge_3 { server edge-3:8080; }
    map $http_x_smoke_edge $smoke_upstream {
        default tokenfan_edges;
        edge-1 smoke_edge_1;
        edge-2 smoke_edge_2;
        edge-3 smoke_edge_3;
    }
"""
conf = conf.replace("    upstream tokenfan_edges {", pins + "\n    upstream tokenfan_edges {", 1)
if "proxy_pass http://tokenfan_edges;" not in conf:
    sys.exit("deploy/nginx.conf changed: update the smoke's copy")
conf = conf.replace("proxy_pass http://tokenfan_edges;", "proxy_pass http://$smoke_upstream;")
open(path, "w").write(conf)
PY

# The override swaps image names (and nginx's configuration, above), and gives every service
# explicit ulimits: through the Docker API podman does not apply containers.conf's
# default_ulimits, and its own defaults are refused here ("error setting rlimits").
service() { # name, image
  printf '  %s:\n    image: %s\n' "$1" "$2"
  printf '    ulimits:\n      nofile: {soft: 20000, hard: 20000}\n      nproc: {soft: 4096, hard: 4096}\n'
}
{
  echo "services:"
  for s in nats-1 nats-2 nats-3; do service "$s" "$REG/nats:$DEBIAN_RELEASE-r$STANDIN_REV"; done
  service redis "$REG/redis:$DEBIAN_RELEASE-r$STANDIN_REV"
  for s in generator-1 generator-2 edge-1 edge-2 edge-3; do service "$s" "$TOKENFAN_IMAGE"; done
  service nginx "$REG/nginx:$DEBIAN_RELEASE-r$STANDIN_REV"
  printf '    volumes:\n      - %s:/etc/nginx/nginx.conf:ro\n' "$state/nginx.conf"
  service prometheus "$REG/prometheus:$DEBIAN_RELEASE-r$STANDIN_REV"
} >"$state/compose.override.yaml"
# The load profile's services (deploy/compose.loadtest.yaml), for its step only.
{
  echo "services:"
  for s in loadgen loadtest-merge; do service "$s" "$TOKENFAN_IMAGE"; done
} >"$state/compose.load-override.yaml"
load=(docker-compose -p "$PROJECT" -f deploy/compose.yaml -f deploy/compose.loadtest.yaml
  -f "$state/compose.override.yaml" -f "$state/compose.load-override.yaml")

step "podman system service (Docker API on $state/podman.sock)"
rm -f "$state/podman.sock"
podman system service --time=0 "$DOCKER_HOST" >"$state/service.log" 2>&1 &
echo $! >"$state/service.pid"
for _ in $(seq 1 100); do
  curl -fsS --unix-socket "$state/podman.sock" http://d/_ping >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS --unix-socket "$state/podman.sock" http://d/_ping >/dev/null || die "podman's API socket did not answer"

# No systemd here: run every container's healthcheck every 2 s (compose says 5-10 s; podman
# records each result, which is what compose's depends_on and this script wait on).
(
  while :; do
    for c in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter health=starting --filter health=healthy --filter health=unhealthy 2>/dev/null); do
      podman healthcheck run "$c" >/dev/null 2>&1 &
    done
    wait
    sleep 2
  done
) &
echo $! >"$state/ticker.pid"

step "compose up: nats x3, redis, generator x2, edge x3, nginx, prometheus"
up_start=$SECONDS
if ! "${compose[@]}" up -d --no-build >"$state/up.log" 2>&1; then
  cat "$state/up.log" >&2
  die "docker-compose up failed"
fi
containers=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT")
[ "$(echo "$containers" | wc -l)" -eq 11 ] || die "expected 11 containers, got: $(podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}' | tr '\n' ' ')"
wait_healthy() { # seconds
  local deadline=$((SECONDS + $1)) c status pending
  while :; do
    pending=""
    for c in $(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT"); do
      status=$(podman inspect --format '{{.Name}}={{.State.Status}}/{{.State.Health.Status}}' "$c")
      case "$status" in *=running/healthy) ;; *) pending+=" $status" ;; esac
    done
    [ -z "$pending" ] && return 0
    [ $SECONDS -lt "$deadline" ] || die "not healthy after $1 s:$pending"
    sleep 1
  done
}
wait_healthy 180
echo "all 11 containers healthy, $((SECONDS - up_start))s after compose up"
# Readiness (NATS, Redis and a generator reachable), asked inside each edge container on the
# port that serves /readyz, with the image's bash (it has no curl).
for i in 1 2 3; do
  c=$(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=edge-$i")
  ready=$(podman exec "$c" bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" >&3
    IFS= read -r -t 5 status <&3; echo "$status"' _ "$EDGE_ADMIN_PORT" 2>&1 | tr -d '\r' || true)
  case "$ready" in "HTTP/1.1 200"*) ;; *) die "edge-$i: GET /readyz on port $EDGE_ADMIN_PORT answered: $ready" ;; esac
done
echo "ok    edge-1..3 ready (GET /readyz on port $EDGE_ADMIN_PORT: 200)"
# Starts the containers a scenario killed or stopped (podman does not apply the restart policy
# to a container it was told to kill or stop), waits until they are healthy, and reloads nginx:
# a restarted edge has a new address, which nginx 1.22 without `resolve` learns only then.
restart_stopped() {
  local stopped
  stopped=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" --filter status=exited)
  [ -n "$stopped" ] || return 0
  podman start $stopped >/dev/null 2>&1
  wait_healthy 120
  podman exec "$(name_of nginx)" nginx -s reload 2>/dev/null
}
name_of() { # service -> container name
  podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n1
}

# ------------------------------------------------------------------ 4. through nginx
step "streams through nginx on 127.0.0.1:$HTTP_PORT"
client=(python3 "$root/scripts/compose_smoke_client.py" --url "http://127.0.0.1:$HTTP_PORT"
  --redis-container "$(name_of redis)")

"${client[@]}" openai
"${client[@]}" resume
"${client[@]}" stop

step "podman kill of the edge that owns a stream, while a client reads it through nginx"
"${client[@]}" kill --kill-cmd "podman kill {container}" --container-of "$PROJECT"
restart_stopped

step "podman stop of an edge with streams in flight"
"${client[@]}" drain --stop-cmd "podman stop -t 30 {container}" --container-of "$PROJECT"
restart_stopped

step "load profile: 2 loadgen replicas through nginx, one --start-at window, merged"
# Small on purpose (this checks the profile works, it measures nothing): every replica verifies
# its streams, and the merge refuses results of different windows or settings.
export START_AT=$(($(date +%s) + 10))
export LOADTEST_CONCURRENCY=10 LOADTEST_MAX_TOKENS=40 LOADTEST_RAMP=1 LOADTEST_WARMUP=1 \
  LOADTEST_DURATION=4
if ! timeout 180 "${load[@]}" --profile load up --no-build --no-deps --scale loadgen=2 loadgen \
  >"$state/load.log" 2>&1; then
  tail -n 30 "$state/load.log" >&2
  die "the load profile's loadgen replicas did not run"
fi
for c in $(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=loadgen"); do
  code=$(podman inspect --format '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || {
    podman logs --tail 20 "$c" >&2
    die "loadgen replica $(podman inspect --format '{{.Name}}' "$c") exited $code"
  }
done
if ! merged=$(timeout 120 "${load[@]}" --profile load run --rm --no-deps loadtest-merge 2>&1); then
  echo "$merged" | tail -n 30 >&2
  die "the load profile's merge failed"
fi
echo "$merged" | grep -q "merged from 2 runs" || {
  echo "$merged" | tail -n 30 >&2
  die "the merged report is not one of 2 runs"
}
echo "ok    load profile: 2 replicas, one window, merged ($(echo "$merged" | grep -m1 'tokens:' | tr -s ' ' | cut -c1-120))"

step "Prometheus (127.0.0.1:$PROMETHEUS_PORT) scraped every edge and generator"
python3 - "$PROMETHEUS_PORT" "$EDGE_ADMIN_PORT" <<'PY'
import json, sys, time, urllib.parse, urllib.request
port, edge_port = sys.argv[1], sys.argv[2]
want = {f"edge-{i}:{edge_port}" for i in (1, 2, 3)} | {f"generator-{i}:9464" for i in (1, 2)}
query = 'up{job=~"tokenfan-edge|tokenfan-generator"}'
deadline = time.monotonic() + 60
while True:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.load(urllib.request.urlopen(url, timeout=5))
    up = {r["metric"]["instance"] for r in body["data"]["result"] if r["value"][1] == "1"}
    if want <= up:
        break
    if time.monotonic() > deadline:
        sys.exit(f"Prometheus has not scraped {sorted(want - up)} (up: {sorted(up)})")
    time.sleep(1)
# And the scrapes carried tokenfan's own series, not only `up`.
query = 'group by (instance) (last_over_time({__name__=~"tokenfan_(edge|generator)_.+"}[10m]))'
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
got = {r["metric"]["instance"] for r in json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]}
if not want <= got:
    sys.exit(f"no tokenfan_* series scraped from {sorted(want - got)}")
print(f"ok    Prometheus: up == 1 now for {', '.join(sorted(want))}; tokenfan series from each")
PY

step "passed in $((SECONDS - t0))s (image $((size / 1000000)) MB)"
