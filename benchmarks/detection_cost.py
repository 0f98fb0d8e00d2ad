"""What detection costs on this machine: `superweights detect --no-cache` from process start (model load, the
detection passes, verification, the control), against one plain forward pass of the detection prompt.

    .venv/bin/python -m benchmarks.detection_cost    # writes benchmarks/detection.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from superweights.compression.report import SuperWeightReport
from superweights.server.harness import SUPERWEIGHTS

OUT = Path(__file__).resolve().parent / "detection.json"
FORWARD_REPEATS = 5


def forward_pass_seconds() -> float:
    """The median of FORWARD_REPEATS forward passes of the detection prompt through the default model, warm."""
    import torch

    from superweights.compression.detect import DEFAULT_PROMPT
    from superweights.compression.models import load_model, resolve_checkpoint

    model, tokenizer = load_model(resolve_checkpoint())
    ids = torch.tensor([tokenizer(DEFAULT_PROMPT)["input_ids"]])
    times = []
    with torch.inference_mode():
        model(input_ids=ids)
        for _ in range(FORWARD_REPEATS):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    t0 = time.perf_counter()
    done = subprocess.run([SUPERWEIGHTS, "-q", "detect", "--no-cache", "--json"], capture_output=True, text=True,
                          check=False)
    result = {"date": time.strftime("%Y-%m-%d"), "detect_no_cache_seconds": time.perf_counter() - t0,
              "detect_ok": done.returncode == 0, "forward_pass_seconds": forward_pass_seconds()}
    if done.returncode == 0:
        report = SuperWeightReport.from_dict(json.loads(done.stdout))
        result |= {"candidates": len(report.super_weights) + len(report.rejected_candidates),
                   "eval_tokens": report.evaluation.tokens}
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
