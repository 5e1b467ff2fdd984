#!/usr/bin/env bash
# Checks of deploy/ (Helm chart, plain manifests), the Dockerfile and examples/.
#
# Installs Helm's engine (helm-python-sdk, which embeds the Helm Go SDK: no
# helm binary, no cluster) and the Kubernetes OpenAPI schemas
# (kubernetes-validate) into a virtualenv, then runs pytest on tests/deploy.
#
#   bash tests/deploy/run.sh [pytest args...]
#
# DEPLOY_VENV chooses the virtualenv (created if missing, reused otherwise).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${DEPLOY_VENV:-${TMPDIR:-/tmp}/lunanode-csi-deploy-venv}"
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 ships venv separately.
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi

"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml==6.0.4 pytest==9.2.0

cd "$REPO_ROOT"
export PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/deploy "$@"
