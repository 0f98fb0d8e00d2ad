"""Find the MLP down-projection of every decoder block by module structure, not by model name.

A down-projection is the linear map inside a block's MLP that takes the intermediate size back to the hidden
size: `in_features > out_features == hidden_size`, outside any attention submodule, under a numbered block.
That one rule covers `mlp.down_proj` (Llama, Mistral, Qwen2, Phi-3, OLMo, Gemma), `mlp.c_proj` (GPT-2's
Conv1D, whose weight is stored transposed as [in, out]), `mlp.dense_4h_to_h` (GPT-NeoX, Falcon) and `fc2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class NoDownProjectionError(UserError):
    """The model has no module that looks like an MLP down-projection."""


@dataclass(frozen=True)
class DownProjection:
    """One block's MLP down-projection. `weight_matrix()` is always [out=hidden, in=intermediate]."""

    layer: int
    name: str  # module name, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module
    transposed: bool  # True for GPT-2's Conv1D, whose parameter is [in, out]

    def weight_matrix(self) -> torch.Tensor:
        w = self.module.weight
        return w.t() if self.transposed else w

    def get(self, row: int, col: int) -> float:
        return float(self.weight_matrix().detach()[row, col])

    @torch.no_grad()
    def set(self, row: int, col: int, value: float) -> None:
        self.weight_matrix()[row, col] = value


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(text_config, key, None), int):
            return getattr(text_config, key)
    return model.get_input_embeddings().embedding_dim


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) for a dense linear layer or a GPT-2 Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight.shape[0], module.nf, True
    return None


def find_down_projections(model: nn.Module) -> list[DownProjection]:
    """Every MLP down-projection of the model, ordered by layer.

    Raises:
        NoDownProjectionError: naming what was looked for, when nothing matches.
    """
    hidden = hidden_size(model)
    found: list[DownProjection] = []
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        in_features, out_features, transposed = shape
        layer = _LAYER_INDEX.findall(f".{name}.")
        if out_features != hidden or in_features <= hidden or not layer or _ATTENTION.search(name):
            continue
        found.append(DownProjection(layer=int(layer[-1]), name=name, module=module, transposed=transposed))
    if not found:
        raise NoDownProjectionError(
            f"no MLP down-projection found in {type(model).__name__}: looked for nn.Linear or Conv1D modules "
            f"inside numbered blocks, outside attention, mapping an intermediate size > hidden_size={hidden} "
            f"back to {hidden} (like mlp.down_proj, mlp.c_proj, mlp.dense_4h_to_h)")
    return sorted(found, key=lambda d: (d.layer, d.name))
