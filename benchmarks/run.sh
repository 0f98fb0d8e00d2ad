#!/usr/bin/env bash
# Every CPU benchmark in one go: set-up, the benchmark extra (vLLM's gRPC servicer), the measurements, the report.
# Writes benchmarks/{results,detection,limits}.json, BENCHMARKS.md and benchmarks/*.png; server logs in
# benchmarks/logs/. Arguments go to the serving measurement (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet "smg-grpc-servicer==0.14.1" "aiohttp>=3.9" "psutil>=5.9" \
  2> >(grep -v "is ignored" >&2)  # the `bench` extra, without re-resolving the engine
.venv/bin/python -m benchmarks.serving_default_model cpu "$@"  # -> benchmarks/results.json
.venv/bin/python -m benchmarks.detection_cost                 # -> benchmarks/detection.json
.venv/bin/python -m benchmarks.machine_limits                 # -> benchmarks/limits.json
exec .venv/bin/python -m benchmarks.report  # renders BENCHMARKS.md and the plots from every saved result
