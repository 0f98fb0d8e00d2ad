"""The 8B-shaped GPU benchmarks' CPU-side parts: the model directory, the plugin's entry point on an uninstalled
checkout, the engine options every arm shares, the server-side metrics, the artifact writer, the JSON they write.
No engine starts here."""

import importlib.metadata
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from benchmarks import arms, engine_metrics, gpu_env, model_8b, served_model, servers, serving_side_by_side
from superweights.compression.models import resolve_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The 8B-shaped directory with the default model's tokenizer (what the device runs until Qwen's arrives)."""
    return model_8b.make_model_dir(resolve_checkpoint(None).path, tmp_path_factory.mktemp("m") / "llama3-8b-shape")


def test_the_8b_directory_is_llama_3_8b_shaped_with_the_tokenizers_vocabulary(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["chat_template.jinja", "config.json", "tokenizer.json",
                                                           "tokenizer_config.json"]
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (32, 8, 8192)
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.vocab_size == 49152
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (4096, 14336)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.38e9, rel=1e-3)


def test_vocab_size_follows_the_checkpoint_where_it_pads_the_embedding(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    assert model_8b.vocab_size(tmp_path, range(151665)) == 151936
    assert model_8b.vocab_size(tmp_path / "none", range(49152)) == 49152


def test_the_declared_super_weights_are_meta_llama_3_8bs_and_fit(model_dir):
    assert model_8b.declared_super_weights() == "1:788:2427,1:1384:2427,1:4062:2427"
    report = served_model.Model(model_dir).report()
    assert [(w.module, w.row, w.col) for w in report.super_weights] == [
        ("model.layers.1.mlp.down_proj", r, 2427) for r in (788, 1384, 4062)]


def test_a_dist_info_gives_the_uninstalled_checkout_its_vllm_plugin(tmp_path):
    dist = gpu_env.write_dist_info(tmp_path)
    found = [(e.group, e.name, e.value) for d in importlib.metadata.distributions(path=[str(tmp_path)])
             for e in d.entry_points]
    assert found == [("vllm.general_plugins", "superweights", "superweights.compression.vllm_plugin:register")]
    assert (dist / "METADATA").read_text().startswith("Metadata-Version: 2.1\nName: superweights\n")


def test_every_arm_gets_our_servers_engine_options(model_dir):
    options = served_model.engine_options(served_model.Model(model_dir))
    assert options == {"dtype": "bfloat16", "max_model_len": 2048, "seed": 0, "load_format": "dummy",
                       "enable_lora": True, "max_loras": 4, "max_cpu_loras": 13, "max_lora_rank": 8,
                       "lora_target_modules": ["down_proj"], "max_num_seqs": 1024, "max_num_batched_tokens": 8192}
    assert "enable_lora" not in served_model.engine_options(served_model.Model(model_dir), lora=False)
    old = arms.arm_options("ours-engine-context", served_model.Model(model_dir))
    assert (old["max_num_seqs"], old["max_num_batched_tokens"]) == (128, 2048)


def test_vllms_parser_reads_the_flags_back_as_the_same_options(model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    options = served_model.engine_options(served_model.Model(model_dir))
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(model_dir), *servers.cli_flags(options)]))
    assert {k: getattr(args, k) for k in options} == options


def test_our_server_gets_them_through_its_own_flags(model_dir):
    from superweights.server.cli import build_parser
    from superweights.server.options import engine_options as parse_engine_args

    model = served_model.Model(model_dir)
    spec, metrics_port = arms.server_spec("ours", model, served_model.engine_options(model))
    args = build_parser().parse_args(spec.command[spec.command.index("serve"):])
    assert (args.dtype, args.max_model_len, args.seed, args.super_weights[0].row) == ("bfloat16", 2048, 0, 788)
    assert parse_engine_args(args.engine_arg) == {"load_format": "dummy", "max_num_seqs": 1024,
                                                  "max_num_batched_tokens": 8192}
    assert args.metrics_port == metrics_port and args.max_concurrent >= 256


HISTOGRAM = """# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1"}} {a}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0"}} {b}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf"}} {b}
vllm:time_to_first_token_seconds_count{{engine="0"}} {b}
vllm:time_to_first_token_seconds_sum{{engine="0"}} {s}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0"}} {w}
"""


def test_a_levels_engine_latencies_are_the_difference_of_two_scrapes():
    before = engine_metrics.parse(HISTOGRAM.format(a=10, b=10, s=0.5, w=0))
    after = engine_metrics.parse(HISTOGRAM.format(a=10, b=20, s=5.5, w=7))  # ten more, all in (0.1, 1]
    delta = engine_metrics.histogram_delta(before, after, "vllm:time_to_first_token_seconds", {})
    assert delta == {"count": 10, "mean_ms": pytest.approx(500.0)}
    assert engine_metrics.histogram_delta(after, after, "vllm:time_to_first_token_seconds", {}) is None
    reads = iter([before, after, after])
    with engine_metrics.LevelProbe(lambda: next(reads, after), interval=0.01) as probe:
        pass
    assert probe.summary()["engine_ttft"]["count"] == 10


def test_an_arm_that_does_not_fit_the_budget_is_skipped_and_said(model_dir, tmp_path, monkeypatch):
    for key, value in servers.SERVER_ENV.items():  # run() sets them for its servers; undone after the test
        monkeypatch.setenv(key, value)
    args = Namespace(out=tmp_path, arms=["offline", "ours"], levels=[1], tokens=8, budget_s=0, ready_timeout=1)
    serving_side_by_side.run(served_model.Model(model_dir), args)
    saved = json.loads((tmp_path / "gpu8b_serving.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == ["offline", "ours"] and all("skipped" in a for a in saved["arms"])
    assert saved["super_weights"] == "1:788:2427,1:1384:2427,1:4062:2427" and saved["plugin"]["plugins"]


def test_quantized_artifacts_of_a_random_model_keep_the_planted_super_weights(tmp_path):
    from safetensors.torch import load_file

    from benchmarks import quantized_decode
    from superweights.compression.artifact import decompress_linear
    from superweights.compression.schemes import fit_to_model, get_scheme

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(tiny)
    model = served_model.Model(tiny, super_weights="1:5:100")
    made = quantized_decode.make_artifacts(model, ["w8a8", "w4a16"], tmp_path / "art", device="cpu")
    assert [m["scheme"] for m in made[1:]] == ["w8a8", "w4a16"]
    for scheme_name in ("w8a8", "w4a16"):
        out = tmp_path / "art" / scheme_name
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "superweights"
        assert config["superweights"]["protected_columns"] == {"model.layers.1.mlp.down_proj": [100]}
        tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        prefix = "model.layers.1.mlp.down_proj."
        local = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        scheme = fit_to_model(get_scheme(scheme_name), [128, 256])
        w = decompress_linear(local, scheme, [100])
        assert w[5, 100].item() == quantized_decode.PLANTED, "stored dense, exactly"


def _level(c: int, tok: float, ttft: float | None = None, **server_side) -> dict:
    level = {"concurrency": c, "requests": 2 * c, "tokens": 256 * c, "tokens_per_s": tok, "errors": 0}
    if ttft is not None:
        level.update(ttft_p50_ms=ttft, ttft_p99_ms=2 * ttft, itl_p50_ms=5.0, itl_p99_ms=9.0)
    if server_side:
        level["server_side"] = server_side
    return level


def test_the_quantized_run_takes_every_model_by_default_and_refuses_unknown_ones(capsys):
    from benchmarks import quantized_decode

    assert quantized_decode.parse_args(["run"]).models == ["bf16", "w4a16", "fp8-dynamic", "w8a8"]
    assert quantized_decode.parse_args(["run", "w8a8"]).models == ["w8a8"]
    with pytest.raises(SystemExit):
        quantized_decode.parse_args(["run", "int3"])
    assert "unknown model int3: choose from bf16, w4a16, fp8-dynamic, w8a8" in capsys.readouterr().err


def test_the_report_renders_the_8b_sections_from_saved_results(tmp_path):
    from benchmarks import report

    facts = {"date": "2026-12-01", "gpu": "NVIDIA H200", "gpus": 1, "vllm": "0.26.0", "torch": "2.11.0",
             "smg_grpc_servicer": "0.14.1", "super_weights": "1:788:2427,1:1384:2427,1:4062:2427"}
    queue = {"engine_queue": {"count": 512, "mean_ms": 700.0},
             "peak": {"running": 128, "waiting": 128, "admission_queued": 0}}
    serving = {**facts, "tokens": 128, "per_client": {"1": 4, "32": 2, "256": 2}, "arms": [
        {"arm": "offline", "engine_options": {"max_num_seqs": 1024}, "levels": [_level(1, 100), _level(256, 9000)]},
        {"arm": "ours", "levels": [_level(1, 98, 20), _level(256, 8800, 300, **queue)]},
        {"arm": "ours-ids", "levels": [_level(1, 99, 20), _level(256, 8900, 290)]},
        {"arm": "vllm-openai", "levels": [_level(1, 95, 21), _level(256, 8000, 250)]},
        {"arm": "vllm-grpc", "levels": [_level(1, 100, 22), _level(256, 8700, 280)]},
        {"arm": "vllm-openai-nolora", "skipped": "40 s left in the call's budget"}]}
    lora = {**facts, "tokens": 128, "rounds": 2, "mix": 0.1, "configs": [
        {"config": "down_proj", "base": [_level(1, 90), _level(32, 2000)], "mixed": [_level(32, 1800)]},
        {"config": "off", "base": [_level(1, 100), _level(32, 2500)]},
        {"config": "all", "error": "exit 1: boom"}]}
    quant = {**facts, "weights": "random-initialized, written", "planted": 1.0, "tokens": 128,
             "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256,
                        "num_attention_heads": 32, "num_key_value_heads": 8},
             "make": {"made": [{"init_seconds": 9}, {"scheme": "w4a16", "bytes": 6_050_000_000}]}, "models": [
        {"model": "bf16", "startup_seconds": 60, "engine_values": [0.001], "decode": [_level(1, 100), _level(32, 2000)]},
        {"model": "w4a16", "startup_seconds": 90, "engine_values": [1.0], "decode": [_level(1, 180), _level(32, 2600)]}]}
    for name, data in (("gpu8b_serving", serving), ("gpu8b_lora", lora), ("gpu8b_quant_bf16_w4a16", quant)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    text = "\n".join(report.gpu8b_lines(tmp_path))
    assert "## GPU: an 8B-shaped model" in text and "| ours | 256 | 8,800 | 300 | 600 | 5.00 | 9.00 | 0 |" in text
    assert "ours / offline, tok/s: 1 streams 0.98, 256 streams 0.98" in text
    assert "ours / vllm-openai, TTFT p50: 1 streams 0.95, 256 streams 1.20" in text
    assert "ours-ids / vllm-grpc, tok/s: 1 streams 0.99, 256 streams 1.02" in text and "like-for-like" in text
    assert ("Goals: throughput at least 0.95x offline at 256: met; throughput at least vLLM's gRPC server's "
            "(ours-ids): not met at 1 streams; TTFT p50 no worse than vLLM's OpenAI server's: not met at 256 "
            "streams.") in text
    assert "| ours | 256 | 300 | - | - | 700 | - | 128 | 128 | 0 |" in text, "the engine's queue, shown"
    assert "| on, down_proj only (ours) | mixed | - | 1,800 | 0.72 |" in text and "`all` did not complete" in text
    assert "`vllm-openai-nolora` skipped: 40 s left in the call's budget." in text
    assert "no mixed warm-up in this run" in text
    assert "| w4a16 | 180 | 2,600 | 1.80 / 1.30 | 1.0000 | 90 |" in text
    assert "w4a16 at batch 1: 1.80x bf16 (goal: at least 1.5x; met)." in text
    assert "the weights a step reads take 3.1 ms in bf16 (15.0 GB) and 1.0 ms in w4a16 (5.0 GB" in text
    assert "Not measured: it needs the `nvidia-h200-x2` kind" in text
    assert (tmp_path / "gpu8b_serving.png").is_file()
    assert (tmp_path / "gpu8b_lora.png").is_file() and (tmp_path / "gpu8b_quant.png").is_file()
    assert "![gpu8b_quant.png](benchmarks/gpu/gpu8b_quant.png)" in text
    assert report.gpu8b_lines(tmp_path / "empty") == [], "no 8B results, no section: BENCHMARKS.md stays as it is"
