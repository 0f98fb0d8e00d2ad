#!/usr/bin/env bash
# Idempotent: the command-line tools the deploy tests need, from Debian.
#   prometheus, promtool   (Debian package `prometheus`, 2.42 on bookworm): promtool checks and unit-tests the
#                          rules and config (tests/test_deploy.py); tests/test_prometheus.py starts a real
#                          Prometheus against a real server.
# Silent and instant when both are installed; installing needs root (or sudo). On a host with systemd the
# package also enables its own prometheus.service on :9090 (`systemctl disable --now prometheus` if unwanted);
# the tests start theirs on a free port.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
install() {
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}
echo "tools: installing prometheus and promtool (Debian package prometheus)" >&2
if ! apt-cache show prometheus >/dev/null 2>&1; then
  $sudo apt-get update -qq
fi
install || { $sudo apt-get update -qq && install; }  # stale package lists: refresh once
command -v promtool >/dev/null
