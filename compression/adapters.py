"""Variants of a model as PEFT-format LoRA adapters built from a super-weight report.

Scaling super weight W[row, col] = w by alpha is the update dW = (alpha - 1) * w * e_row e_col^T (alpha = 0
removes it). Super weights of one layer that share a row stack into one rank-1 term:
    dW = e_row (sum_j (alpha - 1) w_j e_col_j)^T  ->  lora_B = e_row (out x 1), lora_A = that row vector (1 x in).
so an adapter's rank per layer is the number of distinct rows. With lora_alpha = r, vLLM applies B @ A unscaled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .detect import SuperWeight, SuperWeightReport

# Variant names, shared by the engine's arms and an artifact's adapters/ directory.
BASE = "base"
REMOVED = "no_super_weights"
REMOVED_ONE = "no_super_weight_"  # + index in the report: only that one removed

# vLLM accepts only these max_lora_rank values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _module_name(parameter: str) -> str:
    return parameter.removesuffix(".weight")


def _shapes(report: SuperWeightReport, shapes: dict[str, tuple[int, int]] | None,
            weights: list[SuperWeight]) -> dict[str, tuple[int, int]]:
    if shapes:
        return shapes
    hidden = report.model["hidden_size"]
    intermediate = report.model.get("intermediate_size")
    if not intermediate:
        raise ValueError("the report lacks intermediate_size: pass the down-projection shapes")
    return {w.module: (hidden, intermediate) for w in weights}


def adapter_tensors(report: SuperWeightReport, alpha: float, zero: bool = False,
                    shapes: dict[str, tuple[int, int]] | None = None,
                    weights: list[SuperWeight] | None = None) -> dict[str, torch.Tensor]:
    """PEFT tensors for "super weights scaled by alpha" (zero=True: the same shapes, all zero: a no-op).

    Args:
        shapes: parameter name -> (out, in) of each down-projection; by default from the report's model info.
        weights: the super weights to act on (default: all of the report's); the others are left as they are.
    """
    weights = report.super_weights if weights is None else weights
    shapes = _shapes(report, shapes, report.super_weights)
    by_layer: dict[str, dict[int, list[SuperWeight]]] = defaultdict(lambda: defaultdict(list))
    for w in report.super_weights:  # every layer of the report, so all variants have the same modules
        by_layer[w.module][w.row].extend([w] if w in weights else [])
    rank = adapter_rank(report)  # one r for all layers: a layer with fewer rows leaves slots at zero
    tensors = {}
    for module, rows in by_layer.items():
        out_features, in_features = shapes[module]
        a = torch.zeros(rank, in_features, dtype=torch.float32)  # [r, in]
        b = torch.zeros(out_features, rank, dtype=torch.float32)  # [out, r]
        if not zero:
            for k, (row, weights) in enumerate(sorted(rows.items())):
                b[row, k] = 1.0
                for w in weights:
                    a[k, w.col] = (alpha - 1.0) * w.value  # dW[row, col] = (alpha - 1) * w
        prefix = f"base_model.model.{_module_name(module)}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    return tensors


def adapter_rank(report: SuperWeightReport) -> int:
    """Largest number of distinct super-weight rows in one layer (at least 1)."""
    rows: dict[str, set[int]] = defaultdict(set)
    for w in report.super_weights:
        rows[w.module].add(w.row)
    return max((len(r) for r in rows.values()), default=1)


def vllm_max_lora_rank(rank: int) -> int:
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def write_adapter(report: SuperWeightReport, out_dir: Path, alpha: float, zero: bool = False,
                  shapes: dict[str, tuple[int, int]] | None = None, base_model: str = "",
                  weights: list[SuperWeight] | None = None) -> Path:
    """Write one PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors) atomically."""
    if not report.super_weights:
        raise ValueError("the report has no super weights: there is nothing to scale or remove")
    tensors = adapter_tensors(report, alpha, zero=zero, shapes=shapes, weights=weights)
    rank = adapter_rank(report)
    leaf_names = sorted({_module_name(w.module).rsplit(".", 1)[-1] for w in report.super_weights})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": leaf_names, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": base_model, "inference_mode": True,
              "superweights": {"alpha": alpha, "zero": zero, "model_sha256": report.model.get("sha256", "")}}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
