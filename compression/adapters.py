"""Variants of a model as PEFT-format LoRA adapters built from a super-weight report.

Scaling super weight W[row, col] = w by alpha is the update dW = (alpha - 1) * w * e_row e_col^T (alpha = 0
removes it). Super weights of one layer that share a row stack into one rank-1 term:
    dW = e_row (sum_j (alpha - 1) w_j e_col_j)^T  ->  lora_B = e_row (out x 1), lora_A = that row vector (1 x in).
so an adapter's rank per layer is the number of distinct rows. With lora_alpha = r, vLLM applies B @ A unscaled.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from .fsutil import replacing_dir
from .report import SuperWeight, SuperWeightReport

# vLLM accepts only these max_lora_rank values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_tensors(report: SuperWeightReport, alpha: float, zero: bool = False,
                    weights: list[SuperWeight] | None = None) -> dict[str, torch.Tensor]:
    """PEFT tensors for "super weights scaled by alpha" (zero=True: the same shapes, all zero: a no-op).

    Args:
        weights: the super weights to act on (default: all of the report's); the others are left as they are.
    """
    weights = report.super_weights if weights is None else weights
    hidden, intermediate = report.model.hidden_size, report.model.intermediate_size
    by_layer: dict[str, dict[int, list[SuperWeight]]] = defaultdict(lambda: defaultdict(list))
    for w in report.super_weights:  # every layer of the report, so all variants have the same modules
        by_layer[w.module][w.row].extend([w] if w in weights else [])
    rank = adapter_rank(report)  # one r for all layers: a layer with fewer rows leaves slots at zero
    tensors = {}
    for module, rows in by_layer.items():
        a = torch.zeros(rank, intermediate, dtype=torch.float32)  # [r, in]
        b = torch.zeros(hidden, rank, dtype=torch.float32)  # [out, r]
        if not zero:
            for k, (row, weights) in enumerate(sorted(rows.items())):
                b[row, k] = 1.0
                for w in weights:
                    a[k, w.col] = (alpha - 1.0) * w.value  # dW[row, col] = (alpha - 1) * w
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    return tensors


def adapter_rank(report: SuperWeightReport) -> int:
    """Largest number of distinct super-weight rows in one layer (at least 1)."""
    rows: dict[str, set[int]] = defaultdict(set)
    for w in report.super_weights:
        rows[w.module].add(w.row)
    return max((len(r) for r in rows.values()), default=1)


def vllm_max_lora_rank(rank: int) -> int:
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def write_adapter(report: SuperWeightReport, out_dir: Path, alpha: float, zero: bool = False, base_model: str = "",
                  weights: list[SuperWeight] | None = None) -> Path:
    """Write one PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors) atomically."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not report.super_weights:
        raise ValueError("the report has no super weights: there is nothing to scale or remove")
    tensors = adapter_tensors(report, alpha, zero=zero, weights=weights)
    rank = adapter_rank(report)
    leaf_names = sorted({w.module.rsplit(".", 1)[-1] for w in report.super_weights})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=leaf_names, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True).to_dict()
    config["target_modules"] = leaf_names  # a set in LoraConfig; sorted, so the file is reproducible
    # ours: vLLM's PEFTHelper reads only the fields it knows; PEFT warns that it ignores this one
    config["superweights"] = {"alpha": alpha, "zero": zero, "model_sha256": report.model.sha256}
    with replacing_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)
