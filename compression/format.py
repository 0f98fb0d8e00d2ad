"""The artifact format in one place: what the writer (compression.artifact, compression.adapters) and the readers
(compression.vllm_plugin in every vLLM worker, the server's engine) must agree on.

    config.json quantization_config.quant_method = QUANT_METHOD; its EXTRA_KEY entry holds protected_columns
    model.safetensors <module>.COLUMN_WEIGHT      [out, k] float32: a protected module's super-weight columns
    ADAPTERS/<variant name>/                      one PEFT adapter per entry of variant_specs(report)

Imported inside every vLLM worker: standard library only at import time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

    from .report import SuperWeight, SuperWeightReport

ARTIFACT_SCHEMA = "superweights.artifact/v1"
ADAPTERS = "adapters"  # DIR/adapters/<variant name>/: the artifact's own adapters
QUANT_METHOD = "superweights"  # vLLM quantization method, registered by compression.vllm_plugin
EXTRA_KEY = "superweights"  # quantization_config's entry for what compressed-tensors has no field for
COLUMN_WEIGHT = "sw_column_weight"
IGNORE = ("lm_head",)  # quantization_config.ignore: Linear modules (by last name component) that stay dense

# Variant names: the engine's arms and an artifact's adapters/ directories.
BASE = "base"
REMOVED = "no_super_weights"
REMOVED_ONE = "no_super_weight_"  # + index in the report: only that one removed
SCALED = "scaled_"  # + alpha (":g"): every super weight times alpha, made on demand
VariantKind = Literal["base", "removed", "removed_one", "scaled"]


def is_quantized_linear(module: nn.Module, fqn: str) -> bool:
    """Whether compression quantizes this module (a torchao-style filter_fn): every nn.Linear but the LM head."""
    from torch import nn

    return isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] not in IGNORE


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint's config.json says about its quantization, read once (`read_quantization`)."""

    method: str = "none"  # quantization_config.quant_method; "none": dense
    format: str | None = None  # compressed-tensors' format, e.g. "int-quantized"
    scheme: str | None = None  # ours (QUANT_METHOD): the scheme name, e.g. "w8a8"
    protected: bool = False  # ours: the super-weight columns are stored dense

    @property
    def needs_plugin(self) -> bool:
        """Only the superweights vLLM plugin (compression.vllm_plugin) can load it."""
        return self.method == QUANT_METHOD

    def describe(self) -> str:
        if self.scheme is None:
            return self.method
        how = "super weights protected by the superweights vLLM plugin" if self.protected else "unprotected"
        return f"{self.scheme} ({self.format}, {how})"


def read_quantization(checkpoint: str | os.PathLike) -> Quantization:
    """The quantization of a checkpoint directory; a dense one, or one without a readable config.json (vLLM says
    why itself), is Quantization()."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return Quantization()
    extra = config.get(EXTRA_KEY) or {}
    return Quantization(method=config.get("quant_method", "none"), format=config.get("format"),
                        scheme=extra.get("scheme"), protected=bool(extra.get("protected_columns")))


def protected_columns(quantization_config: dict[str, Any]) -> dict[str, list[int]]:
    """Module name -> the input columns it stores dense (COLUMN_WEIGHT), from config.json's quantization_config."""
    extra = quantization_config.get(EXTRA_KEY) or {}
    return {name: [int(c) for c in cols] for name, cols in (extra.get("protected_columns") or {}).items()}


@dataclass(frozen=True)
class VariantSpec:
    """One adapter: `weights` scaled by `alpha` (0 removes them), the report's other super weights untouched
    (weights=(): all of them)."""

    name: str
    kind: VariantKind
    alpha: float
    weights: tuple[SuperWeight, ...] = ()


def variant_specs(report: SuperWeightReport) -> list[VariantSpec]:
    """The adapters a report's model is served with besides BASE: all super weights removed, then each one alone
    when there are several (they can act very differently). Empty without super weights."""
    weights = tuple(report.super_weights)
    if not weights:
        return []
    specs = [VariantSpec(REMOVED, "removed", 0.0, weights)]
    if len(weights) > 1:
        specs += [VariantSpec(f"{REMOVED_ONE}{i}", "removed_one", 0.0, (w,)) for i, w in enumerate(weights)]
    return specs


def scaled_spec(report: SuperWeightReport, alpha: float) -> VariantSpec:
    """Every super weight times alpha: the variant CompareGenerations makes on demand."""
    return VariantSpec(f"{SCALED}{alpha:g}", "scaled", alpha, tuple(report.super_weights))
