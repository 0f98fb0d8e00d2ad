"""What protection costs one layer, on the CPU: the superweights plugin's protected down-projection (vLLM's own
linear method inside ProtectedLinearMethod: the protected input channels zeroed for the kernel, then
x[:, cols] @ W[:, cols]^T added in float32) against the same vLLM linear method alone, on an 8B-shaped
down-projection scaled down (in 14336 -> 3584, out 4096 -> 1024), at the token counts of decode and prefill.
A regression in the correction shows here without a GPU; the GPU figures are in BENCHMARKS.md.

    .venv/bin/python -m benchmarks.correction_overhead [--out benchmarks/correction_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

IN_FEATURES, OUT_FEATURES = 14336 // 4, 4096 // 4
COLUMNS = (1229, 1487, 2427)  # protected input channels (three super weights feeding one row)
TOKENS = (1, 8, 32, 256)


def _one_rank() -> None:
    """vLLM's parallel state for one process (its weight parameters ask for their tensor-parallel rank)."""
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    from vllm.config import VllmConfig, set_current_vllm_config

    from superweights.server.harness import free_port

    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                    distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        parallel_state.initialize_model_parallel(1, 1)


def _layer(method, weight: torch.Tensor) -> torch.nn.Module:
    """A down-projection as vLLM builds one: the method creates its parameters, the checkpoint's are loaded,
    then the method prepares them (on CPU: packs the weight for its GEMM)."""
    layer = torch.nn.Module()
    method.create_weights(layer, IN_FEATURES, [OUT_FEATURES], IN_FEATURES, OUT_FEATURES, weight.dtype,
                          weight_loader=lambda param, loaded: param.data.copy_(loaded))
    for name, param in layer.named_parameters():
        loader = getattr(param, "weight_loader", None)
        loader(param, weight if name == "weight" else weight[:, list(COLUMNS)].float())
    method.process_weights_after_loading(layer)
    return layer


def layers(dtype: torch.dtype, seed: int = 0) -> tuple:
    """(plain layer and method, protected layer and method) computing the same y = x W^T: the protected one holds
    the super-weight columns dense and zero in the weight its kernel sees."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from superweights.compression.vllm_plugin import ProtectedLinearMethod

    _one_rank()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator, dtype=torch.float32) * 0.02
    weight[507, list(COLUMNS)] = torch.tensor([5.9, 6.1, -2.1])  # the super weights
    plain = UnquantizedLinearMethod()
    protected = ProtectedLinearMethod(UnquantizedLinearMethod(), list(COLUMNS))
    held_out = weight.clone()
    held_out[:, list(COLUMNS)] = 0.0
    protected_layer = _layer(protected, held_out.to(dtype))
    protected_layer.sw_column_weight.data.copy_(weight[:, list(COLUMNS)])
    return (_layer(plain, weight.to(dtype)), plain), (protected_layer, protected)


def inputs(tokens: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """x: [T, in], with the super activation's channels large, as on the first token of a real prompt."""
    x = torch.randn(tokens, IN_FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    x[:, list(COLUMNS)] *= 400.0
    return x.to(dtype)


def _median_seconds(fn, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def measure(dtype: torch.dtype = torch.float32, tokens: tuple[int, ...] = TOKENS, min_run_time: float = 1.0
            ) -> list[dict]:
    """Per token count: both layers' median time per call, their ratio, and how far apart their outputs are."""
    (plain_layer, plain), (protected_layer, protected) = layers(dtype)
    rows = []
    for t in tokens:
        x = inputs(t, dtype)
        with torch.inference_mode():
            y_plain, y_ours = plain.apply(plain_layer, x), protected.apply(protected_layer, x)
            plain_s = _median_seconds(lambda x=x: plain.apply(plain_layer, x), min_run_time)
            ours_s = _median_seconds(lambda x=x: protected.apply(protected_layer, x), min_run_time)
        rows.append({"tokens": t, "plain_us": round(plain_s * 1e6, 1), "protected_us": round(ours_s * 1e6, 1),
                     "protected_over_plain": round(ours_s / plain_s, 3),
                     "max_abs_difference": float((y_ours.float() - y_plain.float()).abs().max()),
                     "output_scale": float(y_plain.float().abs().max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "correction_overhead.json")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per cell (%(default)s)")
    args = parser.parse_args()
    rows = measure(min_run_time=args.min_run_time)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "dtype": "float32",
              "shape": {"in": IN_FEATURES, "out": OUT_FEATURES, "protected_columns": len(COLUMNS)},
              "command": "python -m benchmarks.correction_overhead", "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"T={row['tokens']:>4}: plain {row['plain_us']:>8.1f} us, protected {row['protected_us']:>8.1f} us "
              f"(x{row['protected_over_plain']:.3f}), max |diff| {row['max_abs_difference']:.2e} of "
              f"{row['output_scale']:.1f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
