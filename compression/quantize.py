"""Round-to-nearest quantization with the super weights and the super activation held out (simulated:
quantize, then dequantize).

    config = RTNConfig(bits=4, granularity="group", group_size=128, clip="search")
    w_hat = quantize_tensor(w, config, protect=[(507, 1229)])      # w: [out, in]
    quantize_model(model, config, protect)                          # every Linear but the LM head, in place
    with quantize_activations(model, ActivationConfig("int8", "token"), held_out={"...down_proj": [1229]}):
        model(ids)                                                  # every Linear's input quantized on the fly

The math, per quantization group g (a tensor, an output row, g consecutive inputs of a row, or a block of N
consecutive elements of the flattened matrix), protected entries excluded from every statistic:
    t = clip threshold (absmax, or z-score mu + z*sigma, or a percentile of |w|, or the searched ratio of absmax)
    scale = t / qmax, qmax = 2^(bits-1) - 1            # symmetric signed grid
    w_hat = clamp(round(w / scale), -qmax - 1, qmax) * scale
and the protected entries are restored exactly afterwards. FP8 (e4m3) uses the same scales with qmax = 448 and
rounds by casting to float8_e4m3fn.

Activations, per token (a row of x: [T, D]) or per tensor, held-out channels excluded:
    scale = absmax(x[:, kept]) / qmax;  x_hat[:, kept] = q(x[:, kept] / scale) * scale;  x_hat[:, held] = x[:, held]
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import UserError
from .format import is_quantized_linear

Granularity = Literal["tensor", "channel", "group", "block"]
Clip = Literal["none", "zscore", "percentile", "search"]
Format = Literal["int", "fp8"]
SEARCH_RATIOS = torch.linspace(0.5, 1.0, 11)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 8
    granularity: Granularity = "channel"
    group_size: int = 128  # "group": consecutive inputs of one output row
    block_size: int = 4096  # "block": consecutive elements of the flattened matrix (the paper's large blocks)
    clip: Clip = "none"
    clip_value: float = 0.0  # z for "zscore" (e.g. 3.0), percent for "percentile" (e.g. 99.9)
    protect: bool = True  # hold the report's super weights out and restore them exactly
    fmt: Format = "int"  # "fp8": float8 e4m3 values (bits must be 8)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"bits must be 4 or 8, got {self.bits}")
        if self.fmt not in ("int", "fp8") or (self.fmt == "fp8" and self.bits != 8):
            raise UserError(f"fmt must be 'int' or 'fp8' (8 bits), got fmt={self.fmt!r} bits={self.bits}")
        if self.granularity not in ("tensor", "channel", "group", "block"):
            raise UserError(f"granularity must be tensor, channel, group or block, got {self.granularity!r}")
        if self.group_size < 2 or self.block_size < 2:
            raise UserError("group_size and block_size must be >= 2")
        if self.clip == "zscore" and self.clip_value <= 0:
            raise UserError("clip='zscore' needs clip_value > 0 (the z threshold, e.g. 3)")
        if self.clip == "percentile" and not 0 < self.clip_value <= 100:
            raise UserError("clip='percentile' needs 0 < clip_value <= 100 (e.g. 99.9)")
        if self.clip not in ("none", "zscore", "percentile", "search"):
            raise UserError(f"clip must be none, zscore, percentile or search, got {self.clip!r}")

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.fmt == "fp8" else 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        size = {"group": f"{self.group_size}", "block": f"{self.block_size}"}.get(self.granularity, "")
        clip = "" if self.clip == "none" else f"-clip:{self.clip}{self.clip_value or ''}"
        kind = "fp8" if self.fmt == "fp8" else f"int{self.bits}"
        return f"{kind}-{self.granularity}{size}{clip}{'-protected' if self.protect else ''}"


def _groups(w: torch.Tensor, config: RTNConfig) -> tuple[torch.Tensor, int]:
    """[G, n] view of w's elements per quantization group, and how many padding elements were added."""
    in_features = w.shape[1]
    if config.granularity == "tensor":
        return w.reshape(1, -1), 0
    if config.granularity == "channel":
        return w, 0
    if config.granularity == "group":
        if in_features % config.group_size:
            raise UserError(f"in_features={in_features} is not a multiple of group_size={config.group_size}")
        return w.reshape(-1, config.group_size), 0
    flat = w.reshape(-1)
    pad = (-flat.numel()) % config.block_size
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, config.block_size), pad


def _fake_quant(x: torch.Tensor, threshold: torch.Tensor, qmax: float) -> torch.Tensor:
    # x: [G, n], threshold: [G, 1]; the integer grid is [-qmax - 1, qmax], FP8 is symmetric
    scale = (threshold / qmax).clamp_min(1e-12)
    if qmax == FP8_MAX:
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale
    return (x / scale).round().clamp(-qmax - 1, qmax) * scale


def clip_threshold(x: torch.Tensor, keep: torch.Tensor, config: RTNConfig) -> torch.Tensor:
    """Per-group clip threshold over the kept (unprotected) entries. x, keep: [G, n] -> [G, 1]."""
    a = x.abs() * keep
    absmax = a.amax(dim=1, keepdim=True)
    if config.clip == "none":
        return absmax
    if config.clip == "zscore":
        count = keep.sum(dim=1, keepdim=True).clamp_min(1)
        mean = (x * keep).sum(dim=1, keepdim=True) / count
        std = (((x - mean) * keep) ** 2).sum(dim=1, keepdim=True).div(count).sqrt()
        return torch.minimum(absmax, mean.abs() + config.clip_value * std)
    if config.clip == "percentile":
        masked = torch.where(keep.bool(), a, torch.full_like(a, float("nan")))
        return torch.nanquantile(masked, config.clip_value / 100, dim=1, keepdim=True)
    # search: per group, the ratio of absmax whose quantization error on the kept entries is smallest
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for ratio in SEARCH_RATIOS.tolist():
        t = absmax * ratio
        err = (((_fake_quant(x.clamp(-t, t), t, config.qmax) - x) * keep) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, t, best)
    return best


def group_thresholds(w: torch.Tensor, config: RTNConfig, keep_matrix: torch.Tensor) -> torch.Tensor:
    """Per-group clip thresholds [G, 1] of w [out, in] over the entries where keep_matrix is 1; the scale of a
    group is threshold / qmax (compression.artifact writes exactly these scales)."""
    x, pad = _groups(w, config)
    keep, _ = _groups(keep_matrix, config)
    if pad:
        keep[-1, keep.shape[1] - pad:] = 0.0
    return clip_threshold(x, keep, config)


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, config: RTNConfig, protect: list[tuple[int, int]] = ()) -> torch.Tensor:
    """Quantize-dequantize one weight matrix [out, in]; protected (row, col) entries come back exactly."""
    w32 = w.detach().float()
    keep_matrix = torch.ones_like(w32)
    for row, col in protect if config.protect else ():
        keep_matrix[row, col] = 0.0
    t = group_thresholds(w32, config, keep_matrix)
    x, _ = _groups(w32, config)
    q = _fake_quant(x.clamp(-t, t), t, config.qmax)
    q = q.reshape(-1)[: w32.numel()].reshape(w32.shape)
    for row, col in protect if config.protect else ():
        q[row, col] = w32[row, col]  # restored exactly
    return q.to(w.dtype)


def quantize_model(model: nn.Module, config: RTNConfig, protect: dict[str, list[tuple[int, int]]] | None = None,
                   filter_fn: Callable[[nn.Module, str], bool] = is_quantized_linear) -> list[str]:
    """Quantize in place the weight of every module that filter_fn(module, name) accepts.

    Args:
        protect: module name ("model.layers.11.mlp.down_proj") -> [(row, col)] held out and restored.
        filter_fn: which modules; by default what an artifact quantizes (every nn.Linear but the LM head).
    Returns:
        the names of the quantized modules.
    """
    protect = protect or {}
    linears = quantized_linears(model, filter_fn)
    for name, module in linears.items():
        module.weight.data = quantize_tensor(module.weight, config, protect.get(name, []))
    return list(linears)


def quantized_linears(model: nn.Module,
                      filter_fn: Callable[[nn.Module, str], bool] = is_quantized_linear) -> dict[str, nn.Module]:
    """Name -> module of every module filter_fn(module, name) accepts, in model order."""
    return {name: module for name, module in model.named_modules() if filter_fn(module, name)}


def protected_entries(report) -> dict[str, list[tuple[int, int]]]:
    """The report's super weights as quantize_model's `protect` argument."""
    entries: dict[str, list[tuple[int, int]]] = {}
    for w in report.super_weights:
        entries.setdefault(w.module, []).append((w.row, w.col))
    return entries


@dataclass(frozen=True)
class ActivationConfig:
    """Dynamic activation quantization of every quantized Linear's input (the "A8" of W8A8)."""

    fmt: Literal["int8", "fp8"] = "int8"
    granularity: Literal["token", "tensor"] = "token"
    protect: bool = True  # hold the super activation's channels out of the scale and pass them through exactly

    def __post_init__(self) -> None:
        if self.fmt not in ("int8", "fp8"):
            raise UserError(f"activation fmt must be int8 or fp8, got {self.fmt!r}")
        if self.granularity not in ("token", "tensor"):
            raise UserError(f"activation granularity must be token or tensor, got {self.granularity!r}")

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.fmt == "fp8" else 127.0

    @property
    def name(self) -> str:
        return f"a{self.fmt}-{self.granularity}{'-protected' if self.protect else ''}"


def quantize_activation(x: torch.Tensor, config: ActivationConfig, held_out: list[int] = ()) -> torch.Tensor:
    """Quantize-dequantize x [..., D] per token (last dim) or per tensor; `held_out` channels pass exactly."""
    x32 = x.float()
    held = torch.tensor(list(held_out) if config.protect else [], dtype=torch.long, device=x.device)
    kept = x32.index_fill(-1, held, 0.0) if held.numel() else x32  # held-out channels excluded from the scale
    if config.granularity == "token":
        threshold = kept.abs().amax(dim=-1, keepdim=True)
    else:
        threshold = kept.abs().amax().reshape(*([1] * x.dim()))
    flat = kept.reshape(-1, x.shape[-1])
    out = _fake_quant(flat, threshold.expand(*kept.shape[:-1], 1).reshape(-1, 1), config.qmax).reshape(x.shape)
    if held.numel():
        out = out.index_copy(-1, held, x32.index_select(-1, held))  # the super activation, exactly
    return out.to(x.dtype)


@contextmanager
def quantize_activations(model: nn.Module, config: ActivationConfig, modules: list[str],
                         held_out: dict[str, list[int]] | None = None):
    """Within the block, the inputs of the named Linear modules are quantized on the fly.

    Args:
        modules: module names whose inputs are quantized (quantize_model's return value).
        held_out: module name -> input channels that carry a super activation (kept exact when config.protect).
    """
    held_out = held_out or {}
    by_name = dict(model.named_modules())
    hooks = []

    def hook_for(name: str):
        def pre_hook(module, args):
            return (quantize_activation(args[0], config, held_out.get(name, ())),) + tuple(args[1:])
        return pre_hook

    try:
        for name in modules:
            hooks.append(by_name[name].register_forward_pre_hook(hook_for(name)))
        yield
    finally:
        for h in hooks:
            h.remove()


def held_out_channels(report) -> dict[str, list[int]]:
    """Module name -> input channels held out of activation quantization: where each super activation enters the
    residual stream, i.e. the columns of the down-projection weights that feed it, whether or not one of them is a
    confirmed super weight (a massive activation that no single weight carries is protected all the same), and the
    column of every super weight."""
    channels: dict[str, list[int]] = {}
    feeders = [f for a in report.super_activations for f in a.feeders]
    for w in [*report.super_weights, *feeders]:
        cols = channels.setdefault(w.module, [])
        if w.col not in cols:
            cols.append(w.col)
    return channels
