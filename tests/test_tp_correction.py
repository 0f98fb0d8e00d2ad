"""The protected-column correction and the engine probe under tensor parallelism, on simulated ranks.

vLLM's down-projection is a RowParallelLinear: rank r holds input columns [r * in / tp, (r + 1) * in / tp) of the
weight, computes a partial sum on its input shard, and the partial sums are all-reduced. Each rank here is the
plugin's ProtectedLinearMethod over a dense stand-in for the quantized kernel, loaded the way vLLM loads a row-parallel
shard; the sum of the ranks' outputs must equal the dense layer, and the probe answers from the rank that holds each
super weight. Tiny real tensors, no engine, no distributed setup.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from superweights.compression.format import COLUMN_WEIGHT
from superweights.compression.vllm_plugin import (
    ProtectedLinearMethod,
    SuperWeightProbe,
    combine_probe_values,
    shard_columns,
)

MODULE = "model.layers.1.mlp.down_proj"
OUT, IN = 8, 16
COLS = [11, 3, 5]  # protected input columns, in the checkpoint's order (not sorted on purpose)
SUPER = [(2, 11, -12.5), (6, 3, 9.0), (2, 5, 4.0)]  # (row, col, value) planted in the dense weight


class DenseMethod:
    """Stands in for the quantized kernel: y = x @ W_shard^T (+ bias); records the input it was given."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra):
        layer.weight = torch.nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                                      dtype=params_dtype), requires_grad=False)

    def process_weights_after_loading(self, layer):
        pass

    def apply(self, layer, x, bias=None):
        layer.seen = x
        y = x @ layer.weight.t()
        return y if bias is None else y + bias


def dense_weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g)  # [out, in]
    for row, col, value in SUPER:
        w[row, col] = value
    return w


def simulated_ranks(w: torch.Tensor, tp: int) -> list[torch.nn.Module]:
    """One down-projection shard per rank, loaded as vLLM loads a protected artifact under TP."""
    stored = w.clone()
    stored[:, COLS] = 0.0  # the artifact's quantized weight has the protected columns zeroed
    column_weight = w[:, COLS].clone()  # [out, k]: the artifact's COLUMN_WEIGHT
    shard = IN // tp
    ranks = []
    for rank in range(tp):
        layer = torch.nn.Module()
        layer.tp_rank, layer.input_size, layer.output_size = rank, IN, OUT
        layer.input_size_per_partition, layer.output_size_per_partition = shard, OUT
        layer.quant_method = ProtectedLinearMethod(DenseMethod(), COLS)
        layer.quant_method.create_weights(layer, shard, [OUT], IN, OUT, torch.float32)
        layer.weight.data.copy_(stored[:, rank * shard:(rank + 1) * shard])  # RowParallelLinear.weight_loader
        param = getattr(layer, COLUMN_WEIGHT)
        param.weight_loader(param, column_weight)
        layer.quant_method.process_weights_after_loading(layer)
        ranks.append(layer)
    return ranks


def all_reduced(ranks: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """RowParallelLinear.forward: each rank on its input shard, bias on rank 0 only, partial sums added."""
    shard = IN // len(ranks)
    bias = torch.arange(OUT, dtype=torch.float32)
    return sum(layer.quant_method.apply(layer, x[:, r * shard:(r + 1) * shard], bias if r == 0 else None)
               for r, layer in enumerate(ranks))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sharded_correction_equals_the_dense_layer(tp):
    w = dense_weight()
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))  # [T, in]
    ranks = simulated_ranks(w, tp)
    torch.testing.assert_close(all_reduced(ranks, x), x @ w.t() + torch.arange(OUT, dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)
    shard = IN // tp
    for r, layer in enumerate(ranks):
        held = [c - r * shard for c in COLS if r * shard <= c < (r + 1) * shard]
        assert getattr(layer, COLUMN_WEIGHT).shape == (OUT, len(held)), "each rank stores only its own columns"
        if held:  # the kernel never saw the protected channels: they skip (activation) quantization
            assert torch.count_nonzero(layer.seen[:, held]) == 0


def test_a_rank_without_protected_columns_runs_the_kernel_alone():
    ranks = simulated_ranks(dense_weight(), 4)  # shard 3 = columns 12-15 holds none of COLS
    assert not ranks[3].quant_method.local_columns and ranks[3].quant_method.columns == COLS
    x = torch.randn(2, IN // 4)
    torch.testing.assert_close(ranks[3].quant_method.apply(ranks[3], x), x @ ranks[3].weight.t())


def test_shard_columns_keeps_the_checkpoint_order():
    assert shard_columns(COLS, 0, 8) == ([1, 2], [3, 5])
    assert shard_columns(COLS, 8, 8) == ([0], [3])
    assert shard_columns(COLS, 12, 4) == ([], [])


def test_column_parallel_protected_module_is_refused():
    layer = torch.nn.Module()
    with pytest.raises(ValueError, match="column-parallel"):
        ProtectedLinearMethod(DenseMethod(), COLS).create_weights(layer, IN, [OUT // 2], IN, OUT, torch.float32)


def _worker(layer: torch.nn.Module) -> SimpleNamespace:
    """What SuperWeightProbe reads from a vLLM worker: the model's modules and the model dtype."""
    model = torch.nn.Module()
    parent = model
    for part in MODULE.split(".")[:-1]:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(MODULE.rsplit(".", 1)[-1], layer)
    return SimpleNamespace(model_runner=SimpleNamespace(model=model,
                                                        model_config=SimpleNamespace(dtype=torch.float32)))


@pytest.mark.parametrize("tp", [1, 2])
def test_probe_reads_each_super_weight_from_the_rank_that_holds_it(tp):
    w = dense_weight()
    entries = [(MODULE, row, col) for row, col, _ in SUPER] + [(MODULE, 0, 14)]  # and an unprotected weight
    per_worker = [SuperWeightProbe.probe_super_weights(_worker(layer), entries)
                  for layer in simulated_ranks(w, tp)]
    if tp == 2:  # col 11 lives on rank 1, cols 3 and 5 on rank 0
        assert [v is None for v in per_worker[0]] == [True, False, False, True]
    values = combine_probe_values(per_worker)
    torch.testing.assert_close(torch.tensor(values), torch.tensor([w[r, c].item() for _, r, c in entries]),
                               atol=1e-5, rtol=1e-5)


def test_probe_on_a_pipeline_stage_without_the_layer_answers_none():
    empty_stage = SimpleNamespace(model_runner=SimpleNamespace(model=torch.nn.Module(),
                                                               model_config=SimpleNamespace(dtype=torch.float32)))
    stage = SuperWeightProbe.probe_super_weights(empty_stage, [(MODULE, 2, 11)])
    assert stage == [None]
    assert combine_probe_values([stage, [-12.5]]) == [-12.5]
    assert combine_probe_values([stage, stage]) == [None]
