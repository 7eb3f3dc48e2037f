#!/usr/bin/env bash
# Validates the Kubernetes manifests offline, against the Kubernetes JSON
# schemas shipped in the PyPI package `kubernetes-validate` (strict: unknown
# fields are errors), for the oldest and newest Kubernetes versions it ships
# that we care about; then the CNI conflist in the ConfigMap, and the node
# address parser of meshnet-k8s-peers on a NodeList fixture.
#
#   deploy/kubernetes/validate.sh            (installs kubernetes-validate with pip when missing)
#   K8S_VERSIONS="1.30.0" deploy/kubernetes/validate.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(dirname "$here")"
KV_VERSION="1.37.0"
K8S_VERSIONS="${K8S_VERSIONS:-1.28.0 1.33.0 1.37.0}"

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
    echo "validate: installing kubernetes-validate==$KV_VERSION (PyPI)" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
fi

manifests=("$here"/*.yaml)
for v in $K8S_VERSIONS; do
    # --strict: reject properties the schema does not know (typos, wrong nesting).
    "$PY" -m kubernetes_validate --strict --quiet -k "$v" "${manifests[@]}"
    echo "kubernetes $v (strict schema): ${#manifests[@]} files valid"
done

# The conflist the DaemonSet installs must be CNI-valid JSON.
"$PY" - "$here/configmap.yaml" <<'PYEOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d.get("kind") == "ConfigMap")
conf = json.loads(cm["data"]["cni-conflist"])
assert conf["cniVersion"] in ("0.4.0", "1.0.0"), conf
assert conf["name"] and all(p.get("type") for p in conf["plugins"]), conf
assert conf["plugins"][0]["type"] == "meshnet-cni", conf
print("cni conflist: valid (%s, %d plugin(s))" % (conf["cniVersion"], len(conf["plugins"])))
PYEOF

# meshnet-k8s-peers reads node InternalIPs out of a NodeList.
fixture='{"kind":"NodeList","items":[
  {"metadata":{"name":"n1"},"status":{"addresses":[{"type": "InternalIP", "address": "192.168.118.44"},{"type":"Hostname","address":"n1"}]}},
  {"metadata":{"name":"n2"},"status":{"addresses":[{"type":"ExternalIP","address":"203.0.113.9"},{"type":"InternalIP","address":"192.168.118.45"}]}},
  {"metadata":{"name":"n3"},"status":{"addresses":[{"type":"InternalIP","address":"fd00::3"}]}}]}'
got="$(printf '%s' "$fixture" | "$deploy/meshnet-k8s-peers" --parse | tr '\n' ' ')"
want="192.168.118.44 192.168.118.45 fd00::3 "
if [[ "$got" != "$want" ]]; then
    echo "meshnet-k8s-peers --parse: got '$got', want '$want'" >&2
    exit 1
fi
echo "meshnet-k8s-peers: parses node InternalIPs"
