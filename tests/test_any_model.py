"""Beyond the default model: a model without super weights is served as a normal case, and super weights declared
on vLLM's dummy weights (how the 8B-shaped GPU benchmarks run) give working arms without detection. Both servers
run two front ends on one engine core. Last, the dummy-weight server's engine core is killed under load (quick to
start, and it has adapters and scaled arms), and one of the plain server's front ends is killed."""

import json
import shutil

import grpc
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from reliability.common import adapter_dir_of, adapter_files
from reliability.faults import engine_kill_under_load, front_end_kill
from superweights.compression.models import resolve_checkpoint
from tests.conftest import assert_clean_engine_death, serving, start_server

pytestmark = pytest.mark.slow
DECLARED = "11:507:1229,11:507:1487"


def no_super_weight_model(directory):
    """A small random Llama (head_dim 64, which the CPU attention kernels take) with the default model's
    tokenizer less its chat template (a base model's): its activations have no outlier for detection to find."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(None).path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory)


def config_only_copy(directory):
    """The default model's config and tokenizer, no weights: what `--load-format dummy` needs."""
    source = resolve_checkpoint(None).path
    directory.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.is_file() and not path.name.startswith("."):
            shutil.copy(path, directory / path.name)


@pytest.fixture(scope="module")
def adapters_before():
    """The servers' adapter directories on this machine before this module's servers start."""
    return adapter_files()


@pytest.fixture(scope="module")
def models(tmp_path_factory, adapters_before):
    """"plain" and "dummy"; "dummy" admits every call of the kill test at once (they share one connection, so one
    front end gets them all: 4 of --max-concurrent 8) and runs no canary (its requests would blur "every call
    inside the engine")."""
    root = tmp_path_factory.mktemp("any_model")
    no_super_weight_model(root / "plain")
    config_only_copy(root / "dummy")
    # enforce_eager: without LoRA the CPU build compiles for about 40 s at every start
    with serving({"plain": start_server(root / "plain.log", str(root / "plain"), "--engine-arg", "enforce_eager=true",
                                        "--front-ends", "2"),
                  "dummy": start_server(root / "dummy.log", str(root / "dummy"), "--super-weights", DECLARED,
                                        "--engine-arg", "load_format=dummy", "--canary-interval", "0",
                                        "--front-ends", "2", "--max-concurrent", "8")}) as running:
        yield running


def test_a_model_without_super_weights_serves_base_only(models):
    plain = models["plain"]
    with plain.client() as client:
        assert client.health() == "SERVING"
        assert list(client.model_info().variants) == ["base"]
        assert client.generate("The capital of France is", max_tokens=4, temperature=0.0)["completion_tokens"] == 4
        with pytest.raises(grpc.RpcError) as e:  # a base model: no chat template to apply
            client.generate("The capital of France is", chat=True, max_tokens=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chat template" in e.value.details()
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


@pytest.mark.ends_server("module")
def test_engine_core_sigkill_under_load(models, adapters_before):
    """Two long streams, each past its first message, and a compare with a scaled arm inside the engine when its
    core is SIGKILLed: health stops saying SERVING within 5 s, every call ends UNAVAILABLE (none finished before
    the kill, none hangs), new calls are refused, the process exits 1, no engine process and no adapter
    directory is left."""
    dummy = models["dummy"]
    adapter_dir = adapter_dir_of(dummy, adapters_before)  # the plain model has no super weights, so no adapters
    assert_clean_engine_death(engine_kill_under_load(dummy, streams=2, compares=1))
    assert adapter_dir is not None and not adapter_dir.exists()


@pytest.mark.ends_server("module")
def test_a_dead_front_end_stops_the_server(models):
    """One of the plain server's two front ends SIGKILLed: health stops saying SERVING within 5 s (the survivor
    drains), the server exits non-zero within its grace for an orchestrator to restart it, and no process is left:
    never a port that is half served without anyone knowing."""
    result = front_end_kill(models["plain"])
    print(f"\nfront end SIGKILL: {result}")
    assert result["front_ends"] == 2
    assert result["not_serving_after_s"] is not None and result["not_serving_after_s"] <= 5, result
    assert result["exit_code"] not in (None, 0) and result["exited_after_s"] < 60, result
    assert result["processes_left"] == [], result
