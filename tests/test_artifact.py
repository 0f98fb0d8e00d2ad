"""Compressed artifacts on a tiny real Llama with a planted super weight: the per-tensor compressed-tensors math,
the plugin's protected-column correction against the dense reference, the exact CPU int8 GEMM, and the manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from superweights.compression.artifact import (
    COLUMN_WEIGHT,
    ArtifactError,
    artifact_adapters,
    compress,
    compress_linear,
    decompress_linear,
    load_artifact_model,
    open_artifact,
)
from superweights.compression.quantize import quantize_activation
from superweights.compression.schemes import SCHEMES, get_scheme
from tests.tiny_models import ByteTokenizer, planted_llama, sampled_text, save_checkpoint

ROW, COL, VALUE = 17, 99, 50.0
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, report) of a saved planted Llama."""
    from superweights.compression.detect import DetectionSettings, find_super_weights
    from superweights.compression.models import resolve_checkpoint

    model = planted_llama(row=ROW, col=COL, value=VALUE)
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_checkpoint(model, directory)
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256),
                                settings=DetectionSettings(eval_tokens=256, window=128), progress=False)
    assert [(w.module, w.row, w.col) for w in report.super_weights] == [(DOWN, ROW, COL)]
    return resolve_checkpoint(str(directory)), report


@pytest.mark.parametrize("name", ["w8a8", "fp8-dynamic", "w4a16"])
def test_protected_columns_are_exact_and_out_of_the_scales(name, tmp_path):
    w = planted_llama(row=ROW, col=COL, value=VALUE).model.layers[1].mlp.down_proj.weight.detach()  # [64, 256]
    scheme = get_scheme(name)
    if scheme.weights.granularity == "group":
        from superweights.compression.schemes import fit_to_model

        scheme = fit_to_model(scheme, [256])
    tensors = compress_linear(w, scheme, [COL])
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = load_file(tmp_path / "t.safetensors")  # round trip through the checkpoint file
    assert loaded[COLUMN_WEIGHT].shape == (64, 1) and loaded[COLUMN_WEIGHT][ROW, 0] == VALUE
    deq = decompress_linear(loaded, scheme, [COL])
    assert deq[ROW, COL] == VALUE  # exact, from the dense copy
    torch.testing.assert_close(deq[:, COL], w[:, COL])
    # scales come from the other columns only: every other weight is within half a step of its own group's max
    others = torch.cat([w[:, :COL], w[:, COL + 1:]], dim=1)
    step = others.abs().max() / scheme.weights.qmax
    error = (torch.cat([deq[:, :COL], deq[:, COL + 1:]], dim=1) - others).abs().max()
    assert error <= (step / 2 if scheme.weights.fmt == "int" else step * 16) + 1e-6
    # unprotected, the planted weight sets row 17's scale: int formats flush the row's other weights to zero
    plain = decompress_linear(compress_linear(w, scheme, []), scheme, [])
    if scheme.weights.fmt == "int" and scheme.weights.granularity == "channel":
        assert (plain[ROW].abs() > 0).sum() < 5


def _plugin_forward(tensors: dict, scheme, cols: list[int], x: torch.Tensor) -> torch.Tensor:
    """superweights.compression.vllm_plugin.ProtectedLinearMethod.apply around a reference int8 kernel."""
    from superweights.compression.vllm_plugin import ProtectedLinearMethod

    class ReferenceKernel:  # what vLLM's W8A8 kernels compute: per-token int8 x, int8 weights, float scales
        def apply(self, layer, x, bias=None):
            w = decompress_linear({k: v for k, v in tensors.items() if k != COLUMN_WEIGHT}, scheme, [])
            return quantize_activation(x, scheme.activations) @ w.t()

    layer = torch.nn.Module()
    if cols:
        layer.register_parameter(COLUMN_WEIGHT, torch.nn.Parameter(tensors[COLUMN_WEIGHT], requires_grad=False))
        layer.register_buffer("sw_columns", torch.tensor(cols))
    return ProtectedLinearMethod(ReferenceKernel(), cols).apply(layer, x)


def test_plugin_correction_matches_the_dense_reference():
    model = planted_llama(row=ROW, col=COL, value=VALUE)
    down = model.model.layers[1].mlp.down_proj
    scheme = SCHEMES["w8a8"]
    captured = {}
    handle = down.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0][0]))
    with torch.no_grad():
        model(input_ids=torch.arange(32)[None])
    handle.remove()
    x = captured["x"]  # [32, 256]: channel 99 carries the planted activation
    assert x[:, COL].abs().min() > 10 * x[:, :COL].abs().max()
    dense = x @ down.weight.detach().t()
    protected = _plugin_forward(compress_linear(down.weight, scheme, [COL]), scheme, [COL], x)
    unprotected = _plugin_forward(compress_linear(down.weight, scheme, []), scheme, [], x)
    # the correction: quantized(x with channel 99 zeroed) + x[:, 99] * W[:, 99] in float32
    torch.testing.assert_close(protected, dense, atol=0.05 * dense.abs().max().item(), rtol=0.0)
    assert (protected - dense).norm() < 0.25 * (unprotected - dense).norm()
    # and exactly the reference math it stands for
    w = decompress_linear(compress_linear(down.weight, scheme, [COL]), scheme, [COL])
    reference = quantize_activation(x, scheme.activations, held_out=[COL]) @ w.t()
    torch.testing.assert_close(protected, reference, atol=1e-4, rtol=1e-4)


def test_exact_cpu_int8_gemm_is_exact():
    pytest.importorskip("vllm._custom_ops")
    from vllm import _custom_ops as ops

    from superweights.compression.vllm_plugin import ExactCPUInt8, cpu_int8_gemm_saturates

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-128, 128, (96, 256), generator=g, dtype=torch.int16).to(torch.int8)  # [N, K], full range
    scale = torch.rand(96, 1, generator=g) * 0.01 + 1e-3
    x = torch.randn(8, 256, generator=g) + 2.0  # positive-leaning: where u8 x s8 pair sums saturate
    exact = ExactCPUInt8(w, scale, torch.float32)(x, None)
    xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    reference = (xq.double() * xs.double()) @ (w.double() * scale.double()).t()
    torch.testing.assert_close(exact.double(), reference, rtol=1e-5, atol=1e-4)
    if cpu_int8_gemm_saturates():  # this machine (AVX2, no VNNI): vLLM's kernel alone is visibly off
        handler_weight, handler_scale = w.contiguous(), scale.flatten().contiguous()
        handler = ops.create_onednn_scaled_mm(handler_weight.t(), handler_scale, torch.float32, True, False, 32)
        out = torch.empty(8, 96)
        ops.onednn_scaled_mm(handler, xq, out, xs, None, None, None)
        assert (out.double() - reference).norm() / reference.norm() > 1e-3


def test_compress_writes_a_verified_artifact(tiny, tmp_path):
    checkpoint, report = tiny
    artifact = compress(checkpoint, report, SCHEMES["w8a8"], tmp_path / "a", progress=False, eval_tokens=256)
    files = set(artifact.manifest["files"])
    assert {"config.json", "model.safetensors", "report.json", "evaluation.json",
            "adapters/no_super_weights/adapter_model.safetensors"} <= files
    config = json.loads((artifact.path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "superweights" and config["format"] == "int-quantized"
    assert config["superweights"]["protected_columns"] == {DOWN: [COL]}
    assert artifact_adapters(artifact) == {"no_super_weights": artifact.path / "adapters" / "no_super_weights"}
    model, modules, held = load_artifact_model(artifact.path, artifact.scheme)
    assert model.model.layers[1].mlp.down_proj.weight[ROW, COL] == VALUE and held == {DOWN: [COL]}
    e = artifact.evaluation  # a random tiny model on Moby-Dick: the numbers only have to exist
    assert e["tokens"] == 256 and e["perplexity"] > 1 and e["removed_perplexity"] > 1


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_artifact_is_refused_naming_the_file(tiny, tmp_path, damage):
    checkpoint, report = tiny
    artifact = compress(checkpoint, report, SCHEMES["w8a8"], tmp_path / "a", progress=False, eval_tokens=128)
    target = artifact.path / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(ArtifactError, match="model.safetensors"):
        open_artifact(artifact.path)
    from tests.conftest import run_cli

    done = run_cli("serve", str(artifact.path), "--port", "0", timeout=120)
    assert done.returncode == 2 and "model.safetensors" in done.stderr and "Traceback" not in done.stderr


def test_a_model_with_biased_projections_compresses(tmp_path):
    """Found on Qwen2.5-Coder-0.5B on the H200: the artifact's offline evaluation dropped every q/k/v bias while it
    gathered each module's compressed tensors ("does not fit its config: missing [...q_proj.bias...]"). A tiny
    Qwen2 (bias in q/k/v) round-trips with its biases exact."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from superweights.compression.detect import DetectionSettings, find_super_weights
    from superweights.compression.models import resolve_checkpoint

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
    save_checkpoint(model, tmp_path / "qwen2")
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256),
                                settings=DetectionSettings(eval_tokens=256, window=128), progress=False)
    artifact = compress(resolve_checkpoint(str(tmp_path / "qwen2")), report, SCHEMES["w8a8"], tmp_path / "a",
                        progress=False, eval_tokens=256)
    loaded, _, _ = load_artifact_model(artifact.path, artifact.scheme)
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(loaded.model.layers[0].self_attn, name).bias,
                                   getattr(model.model.layers[0].self_attn, name).bias, rtol=0, atol=0)
