"""Named quantization schemes: what `superweights eval` compares and `superweights compress` writes.

A scheme is a weight config plus an optional activation config. The three servable ones map onto a
compressed-tensors scheme that vLLM has kernels for:
    w8a8         int8 weights per output channel, int8 activations per token (dynamic)   CPU and GPU
    fp8-dynamic  fp8 e4m3 weights per output channel, fp8 activations per token (dynamic) GPU (CPU: slow)
    w4a16        int4 weights in groups of 128 inputs (64 or 32 where widths need it)    GPU only (Marlin)
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
    servable: bool = False  # has a compressed-tensors layout vLLM serves
    summary: str = ""

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
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        w = self.weights
        kind = "float" if w.fmt == "fp8" else "int"
        weights = QuantizationArgs(num_bits=w.bits, type=kind, symmetric=True, dynamic=False, strategy=w.granularity,
                                   group_size=w.group_size if w.granularity == "group" else None)
        inputs = None
        if self.activations:
            inputs = QuantizationArgs(num_bits=8, type="float" if self.activations.fmt == "fp8" else "int",
                                      symmetric=True, dynamic=True, strategy=self.activations.granularity)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)

    @property
    def compression_format(self) -> str:
        if self.weights.bits == 4:
            return "pack-quantized"
        return "float-quantized" if self.weights.fmt == "fp8" else ("int-quantized" if self.activations
                                                                    else "naive-quantized")


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("w8a8", RTNConfig(bits=8, granularity="channel"), ActivationConfig("int8", "token"), servable=True,
           summary="int8 weights per channel, int8 activations per token"),
    Scheme("fp8-dynamic", RTNConfig(bits=8, granularity="channel", fmt="fp8"), ActivationConfig("fp8", "token"),
           servable=True, summary="fp8 weights per channel, fp8 activations per token"),
    Scheme("w4a16", RTNConfig(bits=4, granularity="group", group_size=128), servable=True,
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
