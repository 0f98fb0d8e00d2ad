"""The artifact format's one definition: the layer rule, the variant list, the adapters vLLM loads, the schemes'
compressed-tensors presets, the atomic directory replace, and a vLLM plugin that imports nothing else."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from superweights.compression.adapters import write_adapter
from superweights.compression.format import REMOVED, REMOVED_ONE, is_quantized_linear, scaled_spec, variant_specs
from superweights.compression.fsutil import replacing_dir
from superweights.compression.report import DetectionSettings, EvalFacts, ModelFacts, SuperWeight, SuperWeightReport
from superweights.compression.schemes import SCHEMES

DOWN = "model.layers.1.mlp.down_proj"


def _report(*coordinates: tuple[int, int, float]) -> SuperWeightReport:
    weights = [SuperWeight(layer=1, module=DOWN, row=row, col=col, value=value, input_magnitude=1.0,
                           output_magnitude=1.0) for row, col, value in coordinates]
    model = ModelFacts(architecture="LlamaForCausalLM", num_layers=4, hidden_size=64, intermediate_size=256,
                       model_type="llama", name="tiny", source="", sha256="abc")
    return SuperWeightReport(model=model, prompt="", created_at="", evaluation=EvalFacts.unmeasured(),
                             super_weights=weights, rejected_candidates=[], super_activations=[], layer_stats=[],
                             settings=DetectionSettings())


def test_the_vllm_plugin_imports_only_the_format():
    code = ("import superweights.compression.vllm_plugin, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('superweights.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    loaded = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))  # vLLM may log on stdout before it
    ours = {"compression", "compression.format", "compression.vllm_plugin", "compression.errors"}
    assert loaded <= {f"superweights.{name}" for name in ours}


def test_the_format_module_needs_neither_torch_nor_transformers():
    code = ("import superweights.compression.format, sys; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_every_linear_but_the_lm_head_is_quantized():
    linear = torch.nn.Linear(4, 4)
    assert is_quantized_linear(linear, DOWN) and is_quantized_linear(linear, "model.layers.0.self_attn.q_proj")
    assert not is_quantized_linear(linear, "lm_head") and not is_quantized_linear(linear, "model.lm_head")
    assert not is_quantized_linear(torch.nn.Embedding(4, 4), "model.embed_tokens")


def test_variant_specs_remove_all_then_each_one():
    one = _report((17, 99, 50.0))
    assert [(s.name, s.kind, s.alpha, s.weights) for s in variant_specs(one)] == \
        [(REMOVED, "removed", 0.0, tuple(one.super_weights))]
    two = _report((17, 99, 50.0), (17, 12, -3.0))
    specs = variant_specs(two)
    assert [(s.name, s.kind) for s in specs] == \
        [(REMOVED, "removed"), (f"{REMOVED_ONE}0", "removed_one"), (f"{REMOVED_ONE}1", "removed_one")]
    assert specs[2].weights == (two.super_weights[1],) and all(s.alpha == 0.0 for s in specs)
    assert variant_specs(_report()) == []
    scaled = scaled_spec(two, 1.5)
    assert (scaled.name, scaled.kind, scaled.alpha, scaled.weights) == \
        ("scaled_1.5", "scaled", 1.5, tuple(two.super_weights))


def test_adapter_is_a_peft_lora_that_vllm_reads(tmp_path):
    report = _report((17, 99, 50.0), (17, 12, -3.0))
    path = write_adapter(report, tmp_path / "a", alpha=0.0, weights=[report.super_weights[1]], base_model="m")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 1
    assert config["target_modules"] == ["down_proj"] and config["superweights"]["alpha"] == 0.0
    tensors = load_file(path / "adapter_model.safetensors")
    delta = tensors[f"base_model.model.{DOWN}.lora_B.weight"] @ tensors[f"base_model.model.{DOWN}.lora_A.weight"]
    expected = torch.zeros(64, 256)
    expected[17, 12] = 3.0  # removes -3.0 only; the other super weight is left as it is
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)
    peft_helper = pytest.importorskip("vllm.lora.peft_helper")
    helper = peft_helper.PEFTHelper.from_local_dir(str(path), max_position_embeddings=2048)
    assert helper._validate_features() == [] and helper.vllm_lora_scaling_factor == 1.0


@pytest.mark.parametrize("name", ["w8a8", "fp8-dynamic", "w4a16"])
def test_servable_schemes_agree_with_their_compressed_tensors_preset(name):
    scheme = SCHEMES[name]
    ct = scheme.compressed_tensors_scheme()
    w = scheme.weights
    assert (ct.weights.num_bits, ct.weights.type, ct.weights.strategy, ct.weights.symmetric) == \
        (w.bits, "float" if w.fmt == "fp8" else "int", w.granularity, True)
    assert ct.weights.group_size == (w.group_size if w.granularity == "group" else None)
    if scheme.activations is None:
        assert ct.input_activations is None
    else:
        a = ct.input_activations
        assert (a.num_bits, a.type, a.strategy, a.dynamic) == \
            (8, "float" if scheme.activations.fmt == "fp8" else "int", scheme.activations.granularity, True)


def test_replacing_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").is_file()
    with replacing_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert target.stat().st_mode & 0o777 == 0o755
