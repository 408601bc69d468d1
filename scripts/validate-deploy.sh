#!/usr/bin/env bash
# Static validation of everything tokenfan ships for deployment (no container engine and no
# Kubernetes cluster run on the build machines, so nothing here starts a container):
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
