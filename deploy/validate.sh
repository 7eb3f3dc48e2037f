#!/usr/bin/env bash
# Offline checks of everything in deploy/ that no test runs:
#   - Kubernetes manifests against the Kubernetes schemas (kubernetes/validate.sh);
#   - docker-compose.yml (`docker-compose config` or `docker compose config`);
#   - systemd/meshnet.service (`systemd-analyze verify`, warnings are errors);
#   - Prometheus alert rules (`promtool check rules`, `promtool test rules`) and
#     the Grafana dashboard (JSON);
#   - shell scripts (`sh -n`, and shellcheck when installed).
# A check whose tool is missing says so and is skipped; the Kubernetes one
# installs its validator from PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

"$here/kubernetes/validate.sh"

if command -v docker-compose >/dev/null; then
    docker-compose -f "$here/docker-compose.yml" config -q
    echo "docker-compose.yml: valid (docker-compose)"
elif docker compose version >/dev/null 2>&1; then
    docker compose -f "$here/docker-compose.yml" config -q
    echo "docker-compose.yml: valid (docker compose)"
else
    echo "docker-compose.yml: skipped (no docker-compose)"
fi

if command -v systemd-analyze >/dev/null; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # verify insists that ExecStart's program exists: point it at a real file.
    bin="${MESHNET_BIN:-}"
    for b in "$bin" "${CARGO_TARGET_DIR:-$root/target}/release/meshnet" "${CARGO_TARGET_DIR:-$root/target}/debug/meshnet" /bin/true; do
        if [[ -n "$b" && -x "$b" ]]; then bin="$b"; break; fi
    done
    sed "s#/usr/local/bin/meshnet#$bin#g" "$here/systemd/meshnet.service" > "$tmp/meshnet.service"
    out="$(systemd-analyze verify --man=no "$tmp/meshnet.service" 2>&1)" || { echo "$out" >&2; exit 1; }
    if [[ -n "$out" ]]; then
        echo "systemd/meshnet.service: $out" >&2
        exit 1
    fi
    echo "systemd/meshnet.service: valid (systemd-analyze verify)"
else
    echo "systemd/meshnet.service: skipped (no systemd-analyze)"
fi

if command -v promtool >/dev/null; then
    promtool check rules "$here/prometheus/meshnet-rules.yml"
    (cd "$here/prometheus" && promtool test rules meshnet-rules.test.yml)
    echo "prometheus/meshnet-rules.yml: valid, alerts fire as tested (promtool)"
else
    echo "prometheus/meshnet-rules.yml: skipped (no promtool)"
fi
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"] and all(t["expr"] for p in d["panels"] for t in p["targets"])' \
    "$here/grafana/meshnet-dashboard.json"
echo "grafana/meshnet-dashboard.json: valid JSON, every panel has queries"

for s in "$here/docker-entrypoint.sh" "$here/meshnet-k8s-peers"; do
    sh -n "$s"
done
bash -n "$here/base-image.sh"
if command -v shellcheck >/dev/null; then
    shellcheck "$here/docker-entrypoint.sh" "$here/meshnet-k8s-peers" "$here/base-image.sh" "$here/validate.sh" "$here/kubernetes/validate.sh"
    echo "shell scripts: shellcheck clean"
else
    echo "shell scripts: syntax ok (shellcheck not installed)"
fi
