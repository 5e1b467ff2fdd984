#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, unit and integration tests
# (real loop devices, mounts and mkfs when run as root), and the deploy/ chart tests.
# Installs what the tests need on Debian (xfsprogs for mkfs.xfs, prometheus for the alert
# rules, Python venvs for Helm and for a grpc-core client).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mkfs.xfs >/dev/null || need_pkgs+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null || need_pkgs+=(mount)
command -v blkid >/dev/null || need_pkgs+=(util-linux)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "warning: missing ${need_pkgs[*]} and not root; tests that need them will skip" >&2
  fi
fi
if [ "$(id -u)" -eq 0 ] && [ ! -e /dev/loop-control ]; then
  modprobe loop 2>/dev/null || true
fi
# Prometheus and promtool (Debian's package) for the alert rules' unit tests and the live
# test of alerts and dashboard (tests/prometheus.rs). Without recommends (a node exporter);
# the server the package may start as a service is stopped again: the test runs its own.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing prometheus"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  else
    echo "warning: prometheus/promtool missing and not root; the alert rule tests will skip" >&2
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "==> Python grpcio for tests/grpc_clients.rs"
# A real grpc-core client: the test fails, not skips, when it is missing here.
LUNANODE_CSI_TEST_PYTHON="$(bash tests/grpc/venv.sh)"
export LUNANODE_CSI_TEST_PYTHON
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  echo "==> promtool: check and unit-test the alert rules (deploy/monitoring/)"
  promtool check rules deploy/monitoring/lunanode-csi.rules.yaml
  promtool test rules deploy/monitoring/lunanode-csi.rules.test.yaml
  # tests/prometheus.rs fails, not skips, when Prometheus is missing here.
  export LUNANODE_CSI_REQUIRE_PROMETHEUS=1
fi
echo "==> cargo test"
cargo test --all-targets
cargo test --doc --quiet
echo "==> deploy/ chart tests"
bash tests/deploy/run.sh
echo "==> runtime image: deploy/image/rootfs.sh, checked and run in a chroot (tests/image/run.sh)"
bash tests/image/run.sh
