"""This machine's limits for the default model: memory read bandwidth and matmul FLOP/s at 1 and 2 torch threads,
and the decode ceilings they imply: at batch 1 every weight is read once per token (bandwidth / weight bytes); at
large batch each token costs 2 FLOPs per parameter (FLOP/s / 2 x parameters).

    .venv/bin/python -m benchmarks.machine_limits    # writes benchmarks/limits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "limits.json"
THREADS = (1, 2)
READ_BYTES, MATMUL_SIZE, REPEATS = 256 * 2**20, 2048, 10  # 256 MiB: far larger than the caches


def read_bandwidth() -> float:
    """Bytes per second summing a float32 tensor of READ_BYTES."""
    x = torch.ones(READ_BYTES // 4)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        x.sum()
    return REPEATS * READ_BYTES / (time.perf_counter() - t0)


def matmul_flops() -> float:
    """FLOP/s of a float32 MATMUL_SIZE square matmul (2 n^3 FLOPs each)."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        a @ b
    return REPEATS * 2 * MATMUL_SIZE**3 / (time.perf_counter() - t0)


def machine_limits(weight_bytes: int, params: int) -> dict:
    """Measured bandwidth and FLOP/s per thread count, and the decode ceilings they imply for this model."""
    out = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        bandwidth, flops = read_bandwidth(), matmul_flops()
        out[f"threads_{threads}"] = {
            "read_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9,
            "batch1_ceiling_tok_s": bandwidth / weight_bytes, "compute_ceiling_tok_s": flops / (2 * params)}
    torch.set_num_threads(max(THREADS))
    return {**out, "weight_bytes": weight_bytes, "params": params}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    from superweights.compression.models import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint()
    model, _ = load_model(checkpoint)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    weight_bytes = sum(p.stat().st_size for p in Path(checkpoint.path).glob("*.safetensors"))
    del model
    result = {"date": time.strftime("%Y-%m-%d"), **machine_limits(weight_bytes, params)}
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
