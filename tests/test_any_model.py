"""Beyond the default model: a model without super weights is served as a normal case, and super weights declared
on vLLM's dummy weights (how the 8B-shaped GPU benchmarks run) give working arms without detection."""

import json
import shutil

import grpc
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from superweights.compression.models import resolve_checkpoint
from tests.conftest import serving, start_server

pytestmark = pytest.mark.slow
DECLARED = "11:507:1229,11:507:1487"


def no_super_weight_model(directory):
    """A small random Llama (head_dim 64, which the CPU attention kernels take) with the default model's
    tokenizer: its activations have no outlier for detection to find."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_checkpoint(None).path).save_pretrained(directory)


def config_only_copy(directory):
    """The default model's config and tokenizer, no weights: what `--load-format dummy` needs."""
    source = resolve_checkpoint(None).path
    directory.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.is_file() and not path.name.startswith("."):
            shutil.copy(path, directory / path.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("any_model")
    no_super_weight_model(root / "plain")
    config_only_copy(root / "dummy")
    # enforce_eager: without LoRA the CPU build compiles for about 40 s at every start
    with serving({"plain": start_server(root / "plain.log", str(root / "plain"), "--engine-arg", "enforce_eager=true"),
                  "dummy": start_server(root / "dummy.log", str(root / "dummy"), "--super-weights", DECLARED,
                                        "--engine-arg", "load_format=dummy")}) as running:
        yield running


def test_a_model_without_super_weights_serves_base_only(models):
    plain = models["plain"]
    with plain.client() as client:
        assert client.health() == "SERVING"
        assert list(client.model_info().variants) == ["base"]
        assert client.generate("The capital of France is", max_tokens=4, temperature=0.0)["completion_tokens"] == 4
        report = client.super_weights()
        assert not report.super_weights
        assert json.loads(report.report_json)["layer_stats"], "the evidence (per-layer extremes) is reported"
        one_arm = client.compare("The capital of France is", variants=["base"], max_tokens=2, temperature=0.0)
        assert [a.variant for a in one_arm.arms] == ["base"]
        for args in ({}, {"variants": ["base", "no_super_weights"]}, {"alphas": [0.5]}):
            with pytest.raises(grpc.RpcError) as e:
                client.compare("The capital of France is", max_tokens=2, **args)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no confirmed super weights" in e.value.details()


def test_declared_super_weights_on_dummy_weights(models):
    dummy = models["dummy"]
    with dummy.client() as client:
        info = client.model_info()
        assert {"base", "no_super_weights", "no_super_weight_0", "no_super_weight_1"} <= set(info.variants)
        weights = client.super_weights().super_weights
        assert [(w.layer, w.row, w.col) for w in weights] == [(11, 507, 1229), (11, 507, 1487)]
        for w in weights:  # the values came from the engine itself: the checkpoint holds none
            assert w.HasField("engine_value") and w.engine_value == pytest.approx(w.value, rel=1e-4)
            assert w.module == "model.layers.11.mlp.down_proj"
        response = client.compare("The capital of France is", max_tokens=3, temperature=0.0)
        assert [a.variant for a in response.arms] == ["base", "no_super_weights"]
    assert "declared (layer 11 [507, 1229], layer 11 [507, 1487]), not verified" in dummy.log.read_text()
