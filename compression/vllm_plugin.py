"""vLLM plugin: serve superweights artifacts with their super weights intact.

Installed as the `vllm.general_plugins` entry point `superweights`, so any vLLM process (`vllm serve DIR`, our
server, the engine-core and worker processes) registers the quantization method "superweights" that artifacts
name in config.json. It is compressed-tensors plus, on each protected module:
    y = Q(x with the protected channels zeroed) + x[:, cols] @ W[:, cols]^T      # W[:, cols]: [out, k] float32
Q is vLLM's own compressed-tensors kernel (int8, fp8, Marlin int4); the correction runs in float32.
Under tensor parallelism the down-projection (vLLM's RowParallelLinear) splits its input columns over the ranks and
all-reduces their partial sums, so the correction splits with them: rank r holds the protected columns c_r inside
its input shard and adds x_r[:, c_r] @ W[:, c_r]^T to its partial sum (sum over r = the whole correction).

It also lets LoRA wrap int8 layers on CPU: vLLM's CPU int8 kernel prepacks the weight and sets `weight = None`,
and the LoRA wrapper reads `weight.device`; a zero-size placeholder on the same device answers that.

And it makes CPU int8 exact where vLLM's is not: on x86 without VNNI, oneDNN's int8 GEMM multiplies u8 (the
activation + 128) by s8 weights with vpmaddubsw, which saturates each pair sum at int16: 255 * 127 * 2 > 32767.
Measured here: 1.9% relative error from the kernel alone, more than the quantization's own 1.1%. The plugin
probes the kernel once and, if it saturates, splits every int8 weight as w = 2 * w_hi + w_lo with w_hi in
[-64, 63] and w_lo in {0, 1}: two GEMMs that cannot saturate, whose sum is the exact int8 product.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .format import COLUMN_WEIGHT, EXTRA_KEY, QUANT_METHOD, protected_columns

try:
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
except ImportError:  # vLLM not installed: the module still imports, register() says why it cannot run
    CompressedTensorsConfig = object
    LinearMethodBase = object
    LinearBase = None
    register_quantization_config = None


_LOSSY: bool | None = None
# SUPERWEIGHTS_EXACT_CPU_INT8=0 keeps vLLM's saturating kernel: faster, and 3.3% off in perplexity here
EXACT_CPU_INT8 = os.environ.get("SUPERWEIGHTS_EXACT_CPU_INT8", "1") != "0"


def cpu_int8_gemm_saturates() -> bool:
    """Whether vLLM's CPU oneDNN int8 GEMM saturates pair sums (x86 without VNNI); probed once per process."""
    global _LOSSY
    if _LOSSY is None:
        from vllm import _custom_ops as ops

        k, n = 64, 8
        w = torch.full((n, k), 127, dtype=torch.int8)  # [N, K]
        x = torch.full((1, k), 127.0)
        scale = torch.ones(n)
        handler = ops.create_onednn_scaled_mm(w.t(), scale, torch.float32, True, False, 32)  # points into w, scale
        xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty(1, n)
        ops.onednn_scaled_mm(handler, xq, out, xs, None, None, None)
        exact = float(xs.flatten()[0]) * 127 * 127 * k
        _LOSSY = abs(float(out[0, 0]) - exact) > 1e-3 * exact
    return _LOSSY


class ExactCPUInt8:
    """y = s_x * s_w * (x_q . w) computed as two saturation-free oneDNN GEMMs (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype):
        from vllm import _custom_ops as ops

        w = weight.to(torch.int16)  # [N, K]
        hi = torch.div(w, 2, rounding_mode="floor")  # [-64, 63]
        lo = w - 2 * hi  # {0, 1}
        scale = weight_scale.flatten().float()
        self.n = w.shape[0]
        # the handlers keep pointers into these tensors: they live as long as the handlers
        self.parts = [(part.to(torch.int8).contiguous(), s.contiguous()) for part, s in ((hi, 2 * scale), (lo, scale))]
        self.handlers = [ops.create_onednn_scaled_mm(part.t(), s, out_dtype, True, False, 32)
                         for part, s in self.parts]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from vllm import _custom_ops as ops

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, K]
        xq, xs, _ = ops.onednn_scaled_int8_quant(x2, None, None, True)  # dynamic per token, symmetric
        y = torch.empty((x2.shape[0], self.n), dtype=x.dtype, device=x.device)
        part = torch.empty_like(y)
        ops.onednn_scaled_mm(self.handlers[0], xq, y, xs, None, None, bias)
        ops.onednn_scaled_mm(self.handlers[1], xq, part, xs, None, None, None)
        return (y + part).reshape(*shape[:-1], self.n)


def _is_cpu_dynamic_int8(layer: torch.nn.Module) -> bool:
    from vllm.platforms import current_platform

    weight = getattr(layer, "weight", None)
    scheme = getattr(layer, "scheme", None)
    return (current_platform.is_cpu() and weight is not None and weight.dtype == torch.int8
            and type(scheme).__name__ == "CompressedTensorsW8A8Int8"
            and getattr(scheme, "is_static_input_scheme", True) is False
            and getattr(scheme, "input_symmetric", False) is True)


def shard_columns(columns: list[int], start: int, size: int) -> tuple[list[int], list[int]]:
    """The protected columns inside one rank's input shard [start, start + size): (their positions in `columns`,
    i.e. in the checkpoint's COLUMN_WEIGHT, and their indices into the rank's input)."""
    held = [(i, c - start) for i, c in enumerate(columns) if start <= c < start + size]
    return [i for i, _ in held], [c for _, c in held]


def column_weight_loader(picks: list[int]):
    """vLLM weight loader for COLUMN_WEIGHT: the checkpoint's [out, k] columns -> this rank's [out, k_local]."""

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
        param.data.copy_(loaded_weight[:, picks])

    return load


class ProtectedLinearMethod(LinearMethodBase):
    """Wraps a layer's compressed-tensors method; adds the dense super-weight columns where there are any."""

    def __init__(self, inner, columns: list[int]):
        self.inner = inner
        self.columns = list(columns)  # the module's protected input columns, in the checkpoint's order
        self.local_columns = bool(self.columns)  # whether this rank holds any of them (create_weights)
        self.exact_int8: ExactCPUInt8 | None = None

    def __getattr__(self, name: str) -> Any:  # attributes vLLM looks for on the method it chose
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        self.inner.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                  params_dtype, **extra_weight_attrs)
        if not self.columns:
            return
        if sum(output_partition_sizes) != output_size:
            raise ValueError("superweights: protected columns on a module whose outputs tensor parallelism splits "
                             "(column-parallel) are not supported; super weights live in the down-projection, "
                             "which splits its inputs: serve this artifact with tensor_parallel_size=1")
        from vllm.model_executor.utils import set_weight_attrs

        # RowParallelLinear: this rank holds input columns [start, start + input_size_per_partition)
        start = getattr(layer, "tp_rank", 0) * input_size_per_partition if input_size_per_partition != input_size \
            else 0
        picks, local = shard_columns(self.columns, start, input_size_per_partition)
        self.local_columns = bool(picks)
        weight = torch.nn.Parameter(torch.empty(output_size, len(picks), dtype=torch.float32),
                                    requires_grad=False)  # [out, k_local]
        set_weight_attrs(weight, {"weight_loader": column_weight_loader(picks)})
        layer.register_parameter(COLUMN_WEIGHT, weight)
        layer.register_buffer("sw_columns", torch.tensor(local, dtype=torch.long), persistent=False)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if _is_cpu_dynamic_int8(layer) and EXACT_CPU_INT8 and cpu_int8_gemm_saturates():
            self.exact_int8 = ExactCPUInt8(layer.weight.data, layer.weight_scale.data, torch.get_default_dtype())
            layer.weight = None  # the split copies replace it
        else:
            self.inner.process_weights_after_loading(layer)
        if "weight" in layer._parameters and layer._parameters["weight"] is None:
            device = next((p.device for p in layer.parameters()), torch.device("cpu"))
            layer.weight = torch.nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        if self.local_columns:
            layer.sw_columns = layer.sw_columns.to(getattr(layer, COLUMN_WEIGHT).device)

    def _base(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.exact_int8 is not None:
            return self.exact_int8(x, bias)
        return self.inner.apply(layer, x, bias)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, in_local], this rank's input shard; under tensor parallelism the partial sums of all ranks are
        # all-reduced after this, so each rank adds the columns it holds: sum_r x_r[:, c_r] @ W[:, c_r]^T
        if not self.local_columns:
            return self._base(layer, x, bias)
        cols = layer.sw_columns  # local indices into x
        held = x.index_select(-1, cols).float()  # [T, k]: the super activation's channels, unquantized
        y = self._base(layer, x.index_fill(-1, cols, 0), bias)  # held out of the activation scale
        return (y.float() + held @ getattr(layer, COLUMN_WEIGHT).t()).to(y.dtype)


class SuperWeightsConfig(CompressedTensorsConfig):
    """compressed-tensors with protected columns (config.json: quantization_config.superweights)."""

    def get_name(self) -> str:
        return QUANT_METHOD

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SuperWeightsConfig:
        obj = super().from_config({k: v for k, v in config.items() if k != EXTRA_KEY})
        obj.protected_columns = protected_columns(config)
        return obj

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        method = super().get_quant_method(layer, prefix)
        if LinearBase is not None and isinstance(layer, LinearBase) and isinstance(method, LinearMethodBase):
            protected = getattr(self, "protected_columns", {})  # set by from_config
            return ProtectedLinearMethod(method, protected.get(prefix, []))
        return method


def register() -> None:
    """The `vllm.general_plugins` hook: runs in every vLLM process."""
    if register_quantization_config is None:
        raise ImportError("the superweights vLLM plugin needs vLLM: pip install 'superweights[cpu]' or '[gpu]'")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    if QUANT_METHOD in QUANTIZATION_METHODS and get_quantization_config(QUANT_METHOD) is SuperWeightsConfig:
        return  # registered already in this process
    register_quantization_config(QUANT_METHOD)(SuperWeightsConfig)


class SuperWeightProbe:
    """vLLM worker extension (engine arg `worker_extension_cls`): what the live engine computes for a weight.

    For each (module, row, col), the served module's own forward on x and on x + e_col (x: small random
    activations) differs by exactly the weight column it computes with: (y(x + e_col) - y(x))[row] = W[row, col].
    That is the value vLLM multiplies by, kernels and plugin included, not a value read back from the file.
    Under tensor parallelism each rank answers for the weights in its shard (a down-projection splits its input
    columns, so the rank that holds `col`) and None for the others; pipeline stages answer None for layers they do
    not hold. `combine_probe_values` merges the ranks' answers.

    It also carries one workaround (prepare_pipeline_stages) that the server runs in every worker at start-up.
    """

    def prepare_pipeline_stages(self) -> bool:
        """Allocate the buffer in which a pipeline stage after the first receives the previous stage's activations,
        if vLLM has not. vLLM's model runner allocates it in its dummy run, which the CPU worker runs only to warm
        up compilation, and compilation is off on CPU when LoRA is on (vllm/platforms/cpu.py): every request then
        failed in stage 1 (`assert self.intermediate_tensors is not None` in sync_and_gather_intermediate_tensors)
        and took the engine down. The allocation is the dummy run's own. True where one was made."""
        from vllm.distributed import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or getattr(runner, "intermediate_tensors", False) is not None:
            return False
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
        return True

    @torch.no_grad()
    def probe_super_weights(self, entries: list[tuple[str, int, int]]) -> list[float | None]:
        modules = dict(self.model_runner.model.named_modules())
        dtype = self.model_runner.model_config.dtype
        values = []
        for name, row, col in entries:
            module = modules.get(name)
            module = getattr(module, "base_layer", module)  # under LoRA: the base computation
            if getattr(module, "quant_method", None) is None:  # not on this pipeline stage
                values.append(None)
                continue
            local = local_coordinates(module, row, col)
            values.append(None if local is None else probe_weight(module, *local, dtype))
        return values


def local_coordinates(module: torch.nn.Module, row: int, col: int) -> tuple[int, int] | None:
    """(row, col) in this rank's shard of a linear module, or None where another rank holds the weight."""
    rank = getattr(module, "tp_rank", 0)
    in_local = getattr(module, "input_size_per_partition", module.input_size)
    out_local = getattr(module, "output_size_per_partition", module.output_size)
    in_start = rank * in_local if in_local != module.input_size else 0
    if out_local != module.output_size and type(module).__name__ != "ColumnParallelLinear":
        raise ValueError(f"probing a weight of {type(module).__name__} under tensor parallelism is not supported "
                         "(its output shards are not contiguous); super weights live in the down-projection")
    out_start = rank * out_local if out_local != module.output_size else 0
    if not (in_start <= col < in_start + in_local and out_start <= row < out_start + out_local):
        return None
    return row - out_start, col - in_start


def probe_weight(module: torch.nn.Module, row: int, col: int, dtype: torch.dtype) -> float:
    """W[row, col] (local indices) as the module's own forward computes with it: y(x + e_col) - y(x) at row."""
    param = next(module.parameters())
    in_local = getattr(module, "input_size_per_partition", module.input_size)
    g = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(1, in_local, generator=g)).to(param.device, dtype)  # [1, in_local]
    x_col = x.clone()
    x_col[0, col] += 1.0
    y = module.quant_method.apply(module, x).float()  # [1, out_local]: this rank's partial sum, pre all-reduce
    y_col = module.quant_method.apply(module, x_col).float()
    return float(y_col[0, row] - y[0, row])


def combine_probe_values(per_worker: list[list[float | None]]) -> list[float | None]:
    """One value per entry from every worker's probe answers: the rank that holds it (replicas agree: the
    first); None where no worker does."""
    entries = zip(*per_worker) if per_worker else ()
    return [next((v for v in answers if v is not None), None) for answers in entries]
