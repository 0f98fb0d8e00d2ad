"""Named quantization schemes: what `superweights eval` compares and `superweights compress` writes.

A scheme is a weight config plus an optional activation config. The three servable ones are written as a
compressed-tensors preset (PRESET_SCHEMES) that vLLM has kernels for:
    w8a8         W8A8: int8 weights per output channel, int8 activations per token (dynamic)    CPU and GPU
    fp8-dynamic  FP8_DYNAMIC: fp8 e4m3 weights per output channel, fp8 activations per token     GPU (CPU: slow)
    w4a16        W4A16: int4 weights in groups of 128 inputs (64 or 32 where widths need it)     GPU only (Marlin)
The others exist to show where protection matters (per-tensor scales, the paper's large blocks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError
from .quantize import ActivationConfig, Clip, RTNConfig


@dataclass(frozen=True)
class Scheme:
    name: str
    weights: RTNConfig
    activations: ActivationConfig | None = None
    preset: str | None = None  # the compressed-tensors preset it is written as; None: not servable
    summary: str = ""

    @property
    def servable(self) -> bool:
        """Has a checkpoint layout vLLM serves."""
        return self.preset is not None

    def variant(self, protect: bool, clip: Clip = "none", clip_value: float = 0.0) -> Scheme:
        """The same scheme with protection on/off and another clipping rule."""
        weights = dataclasses.replace(self.weights, protect=protect, clip=clip, clip_value=clip_value)
        activations = dataclasses.replace(self.activations, protect=protect) if self.activations else None
        return dataclasses.replace(self, weights=weights, activations=activations)

    @property
    def label(self) -> str:
        clip = "" if self.weights.clip == "none" else f" clip={self.weights.clip}"
        return f"{self.name}{clip}{' protected' if self.weights.protect else ''}"

    def compressed_tensors_scheme(self):
        """The compressed_tensors QuantizationScheme this scheme is written as."""
        if not self.servable:
            raise UserError(f"scheme {self.name!r} has no checkpoint format; servable schemes: "
                            f"{', '.join(n for n, s in SCHEMES.items() if s.servable)}")
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(self.preset, ["Linear"])
        if self.weights.granularity == "group":  # fitted to the model's widths (fit_to_model)
            scheme.weights = scheme.weights.model_copy(update={"group_size": self.weights.group_size})
        return scheme

    @property
    def compression_format(self) -> str:
        """The compressed-tensors format its Linear weights are stored in (int-quantized, pack-quantized, ...)."""
        from compressed_tensors.compressors.format import infer_module_format
        from torch import nn

        return infer_module_format(nn.Linear, self.compressed_tensors_scheme()).value


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("w8a8", RTNConfig(bits=8, granularity="channel"), ActivationConfig("int8", "token"), preset="W8A8",
           summary="int8 weights per channel, int8 activations per token"),
    Scheme("fp8-dynamic", RTNConfig(bits=8, granularity="channel", fmt="fp8"), ActivationConfig("fp8", "token"),
           preset="FP8_DYNAMIC", summary="fp8 weights per channel, fp8 activations per token"),
    Scheme("w4a16", RTNConfig(bits=4, granularity="group", group_size=128), preset="W4A16",
           summary="int4 weights, groups of 128 inputs (64 on SmolLM2-135M)"),
    Scheme("w8a8-tensor", RTNConfig(bits=8, granularity="channel"), ActivationConfig("int8", "tensor"),
           summary="int8 weights per channel, int8 activations per tensor"),
    Scheme("int8-tensor", RTNConfig(bits=8, granularity="tensor"), summary="int8 weights, one scale per matrix"),
    Scheme("int4-channel", RTNConfig(bits=4, granularity="channel"), summary="int4 weights per channel"),
    Scheme("int4-block", RTNConfig(bits=4, granularity="block", block_size=4096),
           summary="int4 weights, blocks of 4096 elements (the paper's large blocks)"),
)}


GROUP_SIZES = (128, 64, 32)  # the group sizes vLLM's Marlin kernels take


def fit_to_model(scheme: Scheme, in_features: list[int]) -> Scheme:
    """The scheme with a group size that divides every quantized module's input width (SmolLM2-135M: 576 = 4.5 x
    128, so 64); unchanged when it already does or is not group-wise."""
    w = scheme.weights
    if w.granularity != "group" or all(n % w.group_size == 0 for n in in_features):
        return scheme
    for size in GROUP_SIZES:
        if size < w.group_size and all(n % size == 0 for n in in_features):
            return dataclasses.replace(scheme, weights=dataclasses.replace(w, group_size=size))
    raise UserError(f"no group size in {GROUP_SIZES} divides every input width of this model "
                    f"({sorted(set(in_features))})")


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}") from None
