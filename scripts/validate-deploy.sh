#!/usr/bin/env bash
# Static validation of everything tokenfan ships for deployment (nothing here starts a
# container: `make compose-smoke` builds the image and runs the compose topology with podman;
# no Kubernetes cluster runs on the build machines, and the collector, Tempo and Grafana have
# no Debian package, so those stay static):
#   - k8s/overlays/{dev,prod,secure}: `kubectl kustomize`, then `kubernetes-validate --strict` against
#     the oldest and newest Kubernetes versions we support, then `checkov`
#   - deploy/Dockerfile: `checkov`
#   - deploy/compose.yaml (alone and with compose.secure.yaml): `docker-compose config -q` (1.29), and the compose-spec JSON schema
#   - deploy/prometheus.yml: `promtool check config`
#   - the NATS configurations of k8s/ (base, and secure with throwaway certificates) load in a real nats-server
#   - the collector, Tempo and Grafana provisioning files parse as YAML
#   - deploy/grafana/dashboards/*.json: parsed, and every metric and label they query checked
#     against the /metrics of a real tokenfan-edge and tokenfan-generator after one stream
#     (deploy/check_dashboard_metrics.py)
#   - every checkov check skipped below is named in docs/operations.md
#   - the horizontal load test: k8s/loadtest/overlays/{dev,prod} (kustomize, kubernetes-validate
#     --strict, checkov), deploy/compose.loadtest.yaml (docker-compose config over compose.yaml,
#     compose-spec schema), the Job's pod script run by sh for two indexes against a real
#     tokenfan-edge, its logs collected and merged by scripts/loadtest-collect.sh, and the
#     compose profile's commands run the same way as two replicas and the merge
#
#   scripts/validate-deploy.sh        (make validate-deploy; part of make test)
#
# Installs what is missing first: kubectl, docker-compose, nats-server and prometheus (for promtool) from
# Debian; kubernetes-validate, check-jsonschema and checkov from PyPI into .venv-deploy/
# (rebuilt only when deploy/validate-requirements.txt or the Python version changes).
# Ends with the line "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Kubernetes versions the manifests must validate against (oldest and newest supported).
K8S_VERSIONS=(1.30.0 1.37.0)

# checkov checks skipped, with the reason (repeated in docs/operations.md, "Static checks").
#   CKV_K8S_43  images by digest: tags are pinned; the tokenfan digest exists only once you
#               build the image, and third-party digests cannot be resolved offline here.
#               Pin digests in your own overlay (kustomize edit set image name@sha256:...).
#   CKV_K8S_15  (dev overlay only) imagePullPolicy Always: the dev image is loaded into the
#               cluster by hand (kind load / minikube image load); pulling would fail.
SKIP_K8S_COMMON=(CKV_K8S_43)
SKIP_K8S_DEV=(CKV_K8S_15)
#   CKV_K8S_35  (secure overlay only) secrets as environment variables: the NATS server reads
#               its user's password as $NATS_PASSWORD (its configuration cannot read a file;
#               nats-server 2.9 includes only relative paths). The edges read every secret
#               from files.
SKIP_K8S_SECURE=(CKV_K8S_35)
SKIP_DOCKERFILE=()

# ------------------------------------------------------------------ tools
"$root/scripts/install-deps.sh" kubectl:kubectl docker-compose:docker-compose \
  promtool:prometheus nats-server:nats-server python3:python3

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing (Debian): $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$@"
}

venv="$root/.venv-deploy"
req="$root/deploy/validate-requirements.txt"
stamp="$venv/.tokenfan-requirements"
want="$(sha256sum "$req" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$venv/bin/checkov" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "creating $venv (pip install -r deploy/validate-requirements.txt; checkov is large)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
fi

# checkov: no network (no guideline download, no update check).
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true

# ------------------------------------------------------------------ helpers
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# check NAME COMMAND...: runs COMMAND, prints ok/FAIL (and the output on failure).
check() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1))
    echo "ok    $name"
    # Summaries worth seeing on success (checkov counts, dashboard notes).
    grep -E '^(checkov:|note )' "$work/out" | sed 's/^/      /' || true
  else
    failed=$((failed + 1))
    echo "FAIL  $name"
    sed 's/^/      /' "$work/out" | tail -n 40
  fi
}

join_by_comma() {
  local IFS=,
  echo "$*"
}

# checkov_file NAME FRAMEWORK FILE SKIPS...: checkov on one file; fails on any failed check
# and on a run that checked nothing (a file checkov could not parse).
checkov_file() {
  local name=$1 framework=$2 file=$3
  shift 3
  local skip=()
  [ $# -gt 0 ] && skip=(--skip-check "$(join_by_comma "$@")")
  "$venv/bin/checkov" -f "$file" --framework "$framework" --skip-download \
    "${skip[@]}" -o json >"$work/checkov-$name.json" 2>"$work/checkov-$name.err" || true
  "$venv/bin/python" - "$work/checkov-$name.json" "$work/checkov-$name.err" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit("checkov printed no JSON report:\n" + open(sys.argv[2]).read()[-2000:])
reports = data if isinstance(data, list) else [data]
passed = failed = skipped = errors = 0
for r in reports:
    s = r.get("summary", {})
    passed += s.get("passed", 0)
    failed += s.get("failed", 0)
    skipped += s.get("skipped", 0)
    errors += s.get("parsing_errors", 0)
    for c in r.get("results", {}).get("failed_checks", []):
        print(f'{c["check_id"]} {c["check_name"]}: {c.get("resource")}')
print(f"checkov: {passed} passed, {failed} failed, {skipped} skipped, {errors} parse errors")
sys.exit(1 if failed or errors or passed == 0 else 0)
PY
}

kube_validate() { # file version
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$2" "$1"
}

yaml_parses() { # files...
  "$venv/bin/python" - "$@" <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        sys.exit(f"{path}: empty")
PY
}

# The NATS configuration of k8s/ must load in a real nats-server (random loopback ports; the
# cluster routes point at names that do not resolve here, which nats-server tolerates).
# Arguments: the manifest holding the ConfigMap (default k8s/base/nats.yaml) and, for the
# secure overlay, a directory with the TLS files (deploy/secure/make-secrets.sh) that stand in
# for the mounted Secret.
nats_config_loads() {
  "$venv/bin/python" - "$work" "${1:-k8s/base/nats.yaml}" "${2:-}" <<'PY'
import os, re, subprocess, sys, time, yaml
work, manifest, tls = sys.argv[1], sys.argv[2], sys.argv[3]
conf = None
for doc in yaml.safe_load_all(open(manifest)):
    if doc and doc.get("kind") == "ConfigMap":
        conf = doc["data"]["nats.conf"]
if conf is None:
    sys.exit(f"{manifest} has no ConfigMap with nats.conf")
conf = re.sub(r"0\.0\.0\.0:\d+", "127.0.0.1:-1", conf)
conf = conf.replace("/var/run/nats/", work + "/")
if tls:
    conf = conf.replace("/etc/nats-tls/", tls + "/")
path = os.path.join(work, "nats.conf")
open(path, "w").write(conf)
log = open(os.path.join(work, "nats.log"), "w+")
proc = subprocess.Popen(["nats-server", "--config", path], stdout=log, stderr=log,
                        env=dict(os.environ, SERVER_NAME="nats-0", NATS_PASSWORD="example"))
deadline = time.monotonic() + 10
ready = False
while time.monotonic() < deadline and proc.poll() is None:
    log.seek(0)
    if "Server is ready" in log.read():
        ready = True
        break
    time.sleep(0.05)
if proc.poll() is None:
    proc.terminate()
    proc.wait(timeout=10)
log.seek(0)
if not ready:
    sys.exit(f"nats-server did not start with {manifest}'s nats.conf:\n" + log.read()[-2000:])
PY
}

skips_documented() {
  local missing=0
  for id in "${SKIP_K8S_COMMON[@]}" "${SKIP_K8S_DEV[@]}" "${SKIP_K8S_SECURE[@]}" "${SKIP_DOCKERFILE[@]}"; do
    if ! grep -q "$id" docs/operations.md; then
      echo "$id is skipped in scripts/validate-deploy.sh but not explained in docs/operations.md"
      missing=1
    fi
  done
  return $missing
}

# ------------------------------------------------------------------ Kubernetes
for overlay in dev prod secure; do
  rendered="$work/k8s-$overlay.yaml"
  check "kubectl kustomize k8s/overlays/$overlay" \
    bash -c "kubectl kustomize k8s/overlays/$overlay >'$rendered'"
  [ -s "$rendered" ] || continue
  for version in "${K8S_VERSIONS[@]}"; do
    check "kubernetes-validate --strict k8s/overlays/$overlay (Kubernetes $version)" \
      kube_validate "$rendered" "$version"
  done
  skips=("${SKIP_K8S_COMMON[@]}")
  [ "$overlay" = dev ] && skips+=("${SKIP_K8S_DEV[@]}")
  [ "$overlay" = secure ] && skips+=("${SKIP_K8S_SECURE[@]}")
  check "checkov k8s/overlays/$overlay (skipping ${skips[*]})" \
    checkov_file "k8s-$overlay" kubernetes "$rendered" "${skips[@]}"
done
check "nats-server loads the NATS configuration of k8s/base/nats.yaml" nats_config_loads
nats_secure_config_loads() {
  mkdir -p "$work/secure-tls" && cp deploy/secure/make-secrets.sh "$work/secure-tls/" &&
    sh "$work/secure-tls/make-secrets.sh" >/dev/null &&
    nats_config_loads k8s/overlays/secure/nats-secure.yaml "$work/secure-tls"
}
check "nats-server loads the NATS configuration of k8s/overlays/secure (TLS, users)" \
  nats_secure_config_loads
check "YAML parses: collector configs of k8s/" \
  yaml_parses k8s/base/otel-collector-config.yaml k8s/overlays/dev/otel-collector-config.yaml

# ------------------------------------------------------------------ horizontal load test
for overlay in dev prod; do
  rendered="$work/loadtest-$overlay.yaml"
  check "kubectl kustomize k8s/loadtest/overlays/$overlay" \
    bash -c "kubectl kustomize k8s/loadtest/overlays/$overlay >'$rendered'"
  [ -s "$rendered" ] || continue
  for version in "${K8S_VERSIONS[@]}"; do
    check "kubernetes-validate --strict k8s/loadtest/overlays/$overlay (Kubernetes $version)" \
      kube_validate "$rendered" "$version"
  done
  skips=("${SKIP_K8S_COMMON[@]}")
  [ "$overlay" = dev ] && skips+=("${SKIP_K8S_DEV[@]}")
  check "checkov k8s/loadtest/overlays/$overlay (skipping ${skips[*]})" \
    checkov_file "loadtest-$overlay" kubernetes "$rendered" "${skips[@]}"
done

# The pod script of the load test Job, exactly as rendered, run by sh as two indexes of the
# Job (JOB_COMPLETION_INDEX 0 and 1, the ConfigMap as environment, a short run against a real
# tokenfan-edge, each with its own /tmp), then their logs through scripts/loadtest-collect.sh:
# the merged report must cover both pods.
loadtest_job_runs() {
  cargo build -q --locked -p tokenfan-edge -p tokenfan-loadgen --bins
  "$venv/bin/python" - "$work" "$work/loadtest-dev.yaml" <<'PY'
import os, re, shutil, socket, subprocess, sys, time, json, yaml
work, rendered = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
job = next(d for d in docs if d["kind"] == "Job")
env_cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
container = job["spec"]["template"]["spec"]["containers"][0]
command = container["command"]
assert command[:2] == ["/bin/sh", "-c"], command
script = command[2]
root = os.getcwd()
bindir = os.path.join(work, "bin")
os.makedirs(bindir, exist_ok=True)
shutil.copy(os.path.join(root, "target/debug/tokenfan-loadgen"), bindir)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
edge_log = open(os.path.join(work, "edge.log"), "w")
edge = subprocess.Popen([os.path.join(root, "target/debug/tokenfan-edge"), "--listen",
                         f"127.0.0.1:{port}"], stdout=edge_log, stderr=edge_log)
try:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or edge.poll() is not None:
                sys.exit("tokenfan-edge did not start")
            time.sleep(0.1)
    env = dict(os.environ, **env_cm)
    env.update({
        "PATH": bindir + ":" + os.environ["PATH"],
        "TOKENFAN_LOADGEN_TARGET": f"http://127.0.0.1:{port}",
        "TOKENFAN_LOADGEN_CONCURRENCY": "3", "TOKENFAN_LOADGEN_MAX_TOKENS": "20",
        "TOKENFAN_LOADGEN_TTFT_MS": "10", "TOKENFAN_LOADGEN_INTER_TOKEN_MS": "2",
        "TOKENFAN_LOADGEN_RAMP": "0.2", "TOKENFAN_LOADGEN_WARMUP": "0.2",
        "TOKENFAN_LOADGEN_DURATION": "1", "TOKENFAN_LOADGEN_THREADS": "1",
        "TOKENFAN_LOADGEN_START_AT": "%.3f" % (time.time() + 4.0),
    })
    pods, logs = [], []
    for index in (0, 1):
        tmp = os.path.join(work, f"pod-{index}-tmp")
        os.makedirs(tmp, exist_ok=True)
        log = os.path.join(work, f"pod-{index}.log")
        logs.append(log)
        pods.append(subprocess.Popen(
            ["sh", "-c", script.replace("/tmp/", tmp + "/")],
            env=dict(env, JOB_COMPLETION_INDEX=str(index)),
            stdout=open(log, "w"), stderr=subprocess.STDOUT))
    for p in pods:
        if p.wait(timeout=120) != 0:
            sys.exit(f"a pod script ended {p.returncode}")
    out = os.path.join(work, "loadtest-out")
    merged = subprocess.run(
        [os.path.join(root, "scripts/loadtest-collect.sh"), out, *logs],
        env=dict(os.environ, LOADGEN=os.path.join(bindir, "tokenfan-loadgen")),
        capture_output=True, text=True)
    print(merged.stdout[-3000:], merged.stderr[-3000:])
    if merged.returncode != 0:
        sys.exit(f"loadtest-collect.sh ended {merged.returncode}")
    report = json.load(open(os.path.join(out, "merged.json")))
    if len(report.get("parts", [])) != 2 or not report["ok"]:
        sys.exit("the merged report does not cover two clean pods")
    seeds = {p["seed"] for p in report["parts"]}
    if len(seeds) != 2:
        sys.exit(f"the pods used the same seed: {seeds}")
    print(f"note  merged {len(report['parts'])} pods: {report['total']['streams_completed']} streams, "
          f"{report['total']['tokens_window']} tokens in the window, 0 errors")
finally:
    edge.terminate()
    edge.wait(timeout=30)
PY
}
check "the load test Job's pod script, run as indexes 0 and 1 against a real edge, merges" \
  loadtest_job_runs
# The same for compose: the `loadgen` and `loadtest-merge` commands and environments as
# `docker-compose config` resolves them (with START_AT), run by sh as two replicas (their own
# hostnames) against a real tokenfan-edge, then the merge, sharing one results directory.
compose_loadtest_runs() {
  cargo build -q --locked -p tokenfan-edge -p tokenfan-loadgen --bins
  START_AT="$(python3 -c 'import time; print("%.3f" % (time.time() + 8))')" \
    docker-compose -f deploy/compose.yaml -f deploy/compose.loadtest.yaml --profile load \
    config >"$work/compose-loadtest.yaml"
  "$venv/bin/python" - "$work" "$work/compose-loadtest.yaml" <<'PY'
import json, os, shutil, socket, stat, subprocess, sys, time, yaml
work, rendered = sys.argv[1], sys.argv[2]
services = yaml.safe_load(open(rendered))["services"]
root = os.getcwd()
bindir = os.path.join(work, "compose-bin")
os.makedirs(bindir, exist_ok=True)
shutil.copy(os.path.join(root, "target/debug/tokenfan-loadgen"), bindir)
fake = os.path.join(bindir, "hostname")  # each replica's container id
open(fake, "w").write('#!/bin/sh\necho "$FAKE_HOSTNAME"\n')
os.chmod(fake, stat.S_IRWXU)
results = os.path.join(work, "results")
def script(name):
    s = services[name]
    assert s["entrypoint"] == ["/bin/sh", "-c"], s["entrypoint"]
    return s["command"][0].replace("$$", "$").replace("/results/", results + "/")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
edge_log = open(os.path.join(work, "compose-edge.log"), "w")
edge = subprocess.Popen([os.path.join(root, "target/debug/tokenfan-edge"), "--listen",
                         f"127.0.0.1:{port}"], stdout=edge_log, stderr=edge_log)
try:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or edge.poll() is not None:
                sys.exit("tokenfan-edge did not start")
            time.sleep(0.1)
    env = dict(os.environ, **{k: str(v) for k, v in services["loadgen"]["environment"].items()})
    env.update({
        "PATH": bindir + ":" + os.environ["PATH"],
        "TOKENFAN_LOADGEN_TARGET": f"http://127.0.0.1:{port}",
        "TOKENFAN_LOADGEN_CONCURRENCY": "3", "TOKENFAN_LOADGEN_MAX_TOKENS": "20",
        "TOKENFAN_LOADGEN_TTFT_MS": "10", "TOKENFAN_LOADGEN_INTER_TOKEN_MS": "2",
        "TOKENFAN_LOADGEN_RAMP": "0.2", "TOKENFAN_LOADGEN_WARMUP": "0.2",
        "TOKENFAN_LOADGEN_DURATION": "1",
    })
    replicas = [subprocess.Popen(["sh", "-c", script("loadgen")],
                                 env=dict(env, FAKE_HOSTNAME=f"c0ffee{i}"))
                for i in (1, 2)]
    for r in replicas:
        if r.wait(timeout=120) != 0:
            sys.exit(f"a loadgen replica ended {r.returncode}")
    merge_env = dict(os.environ, PATH=env["PATH"],
                     **{k: str(v) for k, v in services["loadtest-merge"]["environment"].items()})
    merged = subprocess.run(["sh", "-c", script("loadtest-merge")], env=merge_env,
                            capture_output=True, text=True)
    if merged.returncode != 0:
        sys.exit(f"loadtest-merge ended {merged.returncode}: {merged.stdout[-2000:]} {merged.stderr[-2000:]}")
    out = os.path.join(results, env["TOKENFAN_LOADGEN_START_AT"])
    report = json.load(open(os.path.join(out, "merged.json")))
    if len(report.get("parts", [])) != 2 or not report["ok"]:
        sys.exit("the merged report does not cover two clean replicas")
    if len({p["seed"] for p in report["parts"]}) != 2:
        sys.exit("the replicas used the same seed")
    if not os.path.exists(os.path.join(out, "merged.svg")):
        sys.exit("no chart")
    print(f"note  merged {len(report['parts'])} replicas: {report['total']['streams_completed']} "
          f"streams, {report['total']['tokens_window']} tokens in the window, 0 errors")
finally:
    edge.terminate()
    edge.wait(timeout=30)
PY
}
check "the compose load profile's commands, run as two replicas and the merge, merge" \
  compose_loadtest_runs
check "docker-compose -f deploy/compose.yaml -f deploy/compose.loadtest.yaml config -q" \
  env START_AT=1 docker-compose -f deploy/compose.yaml -f deploy/compose.loadtest.yaml config -q
check "check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.loadtest.yaml" \
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.loadtest.yaml

# ------------------------------------------------------------------ image and compose
check "checkov deploy/Dockerfile" \
  checkov_file dockerfile dockerfile deploy/Dockerfile "${SKIP_DOCKERFILE[@]}"
check "docker-compose -f deploy/compose.yaml config -q" \
  docker-compose -f deploy/compose.yaml config -q
# The secure override needs its secret files: make a throwaway set in a copy of deploy/.
compose_secure_config() {
  rm -rf "$work/deploy" && cp -r deploy "$work/deploy" &&
    sh "$work/deploy/secure/make-secrets.sh" >/dev/null &&
    docker-compose -f "$work/deploy/compose.yaml" -f "$work/deploy/compose.secure.yaml" config -q
}
check "docker-compose -f deploy/compose.yaml -f deploy/compose.secure.yaml config -q" \
  compose_secure_config
check "check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml" \
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
check "promtool check config deploy/prometheus.yml" \
  promtool check config deploy/prometheus.yml
check "YAML parses: collector, Tempo and Grafana provisioning files of deploy/" \
  yaml_parses deploy/otel-collector.yaml deploy/tempo.yaml \
  deploy/grafana/provisioning/datasources/*.yaml deploy/grafana/provisioning/dashboards/*.yaml
check "every skipped checkov check is explained in docs/operations.md" skips_documented

# ------------------------------------------------------------------ dashboards
check "cargo build -p tokenfan-edge -p tokenfan-generator" \
  cargo build -q -p tokenfan-edge -p tokenfan-generator --locked
check "dashboards query only metrics and labels the binaries export" \
  "$venv/bin/python" deploy/check_dashboard_metrics.py deploy/grafana/dashboards/*.json

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
