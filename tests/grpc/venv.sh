#!/usr/bin/env bash
# Makes the virtualenv with a real non-Go gRPC client (Python grpcio, i.e. grpc-core)
# for tests/grpc_clients.rs, and prints its python's path.
#
#   export LUNANODE_CSI_TEST_PYTHON="$(bash tests/grpc/venv.sh)"
#
# GRPC_VENV chooses the virtualenv (created if missing, reused otherwise). The stubs are
# generated from proto/csi.proto by the test itself, into a temporary directory.
set -euo pipefail

VENV="${GRPC_VENV:-${TMPDIR:-/tmp}/lunanode-csi-grpc-venv}"
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null; then
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 ships venv separately.
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq >&2 && apt-get install -y -qq python3-venv >/dev/null
        fi
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" >&2
    fi
fi

# grpcio 1.85 is the client the refusal was reported with (issue 15).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    grpcio==1.85.1 grpcio-tools==1.85.1 >&2
"$VENV/bin/python" -c 'import grpc, grpc_tools.protoc' >&2
echo "$VENV/bin/python"
