#!/usr/bin/env bash
# One command for every benchmark: set-up, the benchmark extra (vLLM's gRPC servicer), then the run.
# Writes BENCHMARKS.md, benchmarks/results.json, benchmarks/*.png; server logs in benchmarks/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet "smg-grpc-servicer==0.14.1" "aiohttp>=3.9" "psutil>=5.9" \
  2> >(grep -v "is ignored" >&2)  # the `bench` extra, without re-resolving the engine
.venv/bin/python -m benchmarks.run_all "$@"  # measures, writes benchmarks/results.json
exec .venv/bin/python -m benchmarks.report  # renders BENCHMARKS.md and the plots from every saved result
