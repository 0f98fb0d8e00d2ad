#!/usr/bin/env bash
# Set everything up (idempotent), then run the main job. With arguments: any superweights subcommand.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- serve; fi
exec .venv/bin/superweights "$@"
