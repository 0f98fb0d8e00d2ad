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
    every = {**facts, "date": "2026-12-08", "tokens": 128, "rounds": 2, "mix": 0.1, "configs": [
        {"config": "all", "mixed_warmup_seconds": 9.0, "base": [_level(1, 88), _level(32, 1900)],
         "mixed": [_level(32, 950)]}]}
    for name, data in (("gpu8b_serving", serving), ("gpu8b_lora", lora), ("gpu8b_quant_bf16_w4a16", quant),
                       ("gpu8b_lora_every_module", every)):
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
    assert "| on, down_proj only (ours) | mixed | - | 1,800 | 0.72 | 0.90 |" in text and "`all` did not complete" in text
    assert "| on, every module (vLLM's default) | mixed | - | 950 | - | 0.50 |" in text, "its own call: no off"
    assert ("Mixed traffic over base traffic at 32 at once (each ratio within one call, so calls can be set side by "
            "side): every module 0.50 (2026-12-08, H200), down_proj only 0.90 (2026-12-01, H200).") in text
    assert "`vllm-openai-nolora` skipped: 40 s left in the call's budget." in text
    assert "no mixed warm-up in this run" in text
    assert "| w4a16 | 180 | 2,600 | 1.80 / 1.30 | 1.0000 | 90 |" in text
    assert "w4a16 at batch 1: 1.80x bf16 (goal: at least 1.5x; met)." in text
    assert "the weights a step reads take 3.1 ms in bf16 (15.0 GB) and 1.0 ms in w4a16 (5.0 GB" in text
    assert "Not measured: it needs a machine of two GPUs" in text
    assert (tmp_path / "gpu8b_serving.png").is_file()
    assert (tmp_path / "gpu8b_lora.png").is_file() and (tmp_path / "gpu8b_quant.png").is_file()
    assert "![gpu8b_quant.png](benchmarks/gpu/gpu8b_quant.png)" in text
    assert report.gpu8b_lines(tmp_path / "empty") == [], "no 8B results, no section: BENCHMARKS.md stays as it is"


def _runs(*levels: dict) -> list[dict]:
    """Each level twice, run 1 as given and run 2 a little faster (the --repeat 2 form)."""
    return [{**lv, **extra} for lv in levels for extra in
            ({"run": 1}, {"run": 2, "tokens_per_s": lv["tokens_per_s"] * 1.01})]


def test_the_report_renders_several_front_ends_run_by_run(tmp_path):
    from benchmarks import report

    cpu = {"frontend_cpu_s_per_1k_tokens": 0.08, "tokens_per_message": 1.0}
    command = "python3 -m superweights.server.cli -q serve .models/llama3-8b-shape --front-ends 4"
    run = {"date": "2026-12-07", "gpu": "NVIDIA H100 80GB HBM3", "vllm": "0.26.0", "torch": "2.11.0",
           "super_weights": "1:788:2427", "model": {"path": ".models/llama3-8b-shape", "extra": {"compilation_config": {"cudagraph_capture_sizes": [1, 2]}}},
           "config": {"vocab_size": 49152, "_name_or_path": "llama-3-8b-shape (SmolLM2-135M-Instruct-r3 tokenizer)"},
           "levels": [1, 256], "tokens": 128, "prompt_tokens": 32, "budget_s": 500.0, "arms": [
        {"arm": "offline", "engine_options": {"max_num_seqs": 1024},
         "levels": _runs({**_level(1, 100, **_server_side(16, 14)), "batch_seconds_median": 0.65},
                         _level(256, 9000))},
        {"arm": "ours@4", "front_ends": 4, "client_processes": 4, "command": command,
         "levels": _runs({**_level(1, 99, 20, **_server_side(17, 15, servicer=17.5)), **cpu},
                         {**_level(256, 8900, 300), **cpu})},
        {"arm": "vllm-openai@4", "front_ends": 4, "client_processes": 4, "command": "vllm serve --api-server-count 4",
         "levels": _runs(_level(1, 100, 18, **_server_side(15.5, 13.5)), _level(256, 8000, 320))},
        {"arm": "ours@1", "skipped": "127 s left in the call's budget"}]}
    (tmp_path / "gpu8b_front_ends.json").write_text(json.dumps(run))
    text = "\n".join(report.gpu8b_lines(tmp_path))
    assert "### Several front ends" in text and "Not measured yet (`benchmarks/quantized_decode.py`)" in text
    assert ("bash benchmarks/on_gpu.sh serving_side_by_side --arms offline ours@4 vllm-openai@4 ours@1 \\\n#     "
            "--levels 1 256 --repeat 2 --client-processes 4 --budget-s 500 \\\n#     "
            "--engine-option 'compilation_config={\"cudagraph_capture_sizes\":[1,2]}'") in text
    assert "python -m benchmarks.model_8b ~/.cache/superweights/models/SmolLM2-135M-Instruct-r3 .models/llama3" in text
    assert "# ours@4\n" + command in text and "`ours@1` skipped: 127 s left in the call's budget." in text
    assert "So N = 1 was not measured in this call (`ours@1` skipped)" in text
    assert "Not run in this call: token ids only (`ours-ids@N`) and N = 2 and 8 front ends." in text
    assert "| ours@4 | 2 | 8,989 | 0.99 | 300 | 5.00 | 0.080 | 1.000 |" in text, "run 2 against offline's run 2"
    assert "| 256 | 1 | 1.113 | 0.938 | 1.000 | - |" in text, "ours@4 / vllm-openai@4"
    assert ("at least 0.95x the offline engine's tok/s at 256 and 512 streams: run 1 0.989 at 256, met; "
            "run 2 0.989 at 256, met.") in text
    assert ("`ours@4` at least `vllm-openai@4`'s tok/s at every level, with TTFT p50 no worse: run 1 not met (tok/s "
            "0.990x at 1; TTFT p50 1.111x at 1); run 2 not met (tok/s 0.990x at 1; TTFT p50 1.111x at 1).") in text
    assert "run 1 5.00 ms against 5.08 ms, 0.08 ms apart, met" in text
    assert "| ours@4 | 1 | 2 | 20 | 18 | 17 | 0 | 15 | 1 | 0 | 0 |" in text, "the TTFT breakdown, run by run"
    assert "| vllm-openai@4 | 1 | 1 | 18 | - | 16 | 0 | 14 | 1 | 0 | 0 |" in text
    assert ("- `ours@4` against `vllm-openai@4` at 1 streams, run 1: 2.0 ms longer; engine prefill +1.5 ms (ours 15.0, "
            "vllm-openai@4 13.5, the offline engine 14.0 ms), the rest +0.5 ms.") in text
    assert "| offline | 1 | 1 | - | - | 16 | 0 | 14 | 1 | 0 | 0 |" in text, "the engine with no server, beside them"
    assert ("In 2 of these 2, ours' engine prefill was the longer; in 2 of those, ours' was no longer than the offline "
            "engine's (at most 10% above it)") in text
    assert (tmp_path / "gpu8b_front_ends.png").is_file()


def _server_side(engine_ttft: float, prefill: float, servicer: float | None = None) -> dict:
    """What a level's server-side metrics hold (means in ms), at 1 stream."""
    side = {"engine_ttft": {"count": 8, "mean_ms": engine_ttft}, "engine_queue": {"count": 8, "mean_ms": 0.01},
            "engine_prefill": {"count": 8, "mean_ms": prefill}, "peak": {"running": 1.0, "waiting": 0.0,
                                                                          "admission_queued": 0.0}}
    return {**side, "servicer_ttft": {"count": 8, "mean_ms": servicer}} if servicer is not None else side


def _profile_table(rows: list[tuple[str, str, str, int]]) -> str:
    """A key_averages table as vLLM's torch profiler writes it, from (name, self CPU, self CUDA, calls)."""
    header = ["Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA", "Self CUDA %",
              "CUDA total", "CUDA time avg", "# of Calls"]
    rule = "  ".join(["-" * 55, *["-" * 12] * 10])

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].rjust(55), *(c.rjust(12) for c in cells[1:])])

    body = [line([n, "0.00%", cpu, "0.00%", cpu, cpu, cuda, "0.00%", cuda, cuda, str(calls)])
            for n, cpu, cuda, calls in rows]
    return "\n".join([rule, line(header), rule, *body, rule, "Self CPU time total: 9.000ms", ""])


def test_the_report_renders_quantized_decode_side_by_side_and_the_profile(tmp_path):
    from benchmarks import report

    def model(name: str, one: float, many: float, profile: bool = False) -> dict:
        entry = {"model": name, "engine_options": {"compilation_config": {"cudagraph_capture_sizes": [1, 32]}},
                 "engine_values": [0.1], "decode": _runs(_level(1, one), _level(32, many))}
        return {**entry, "profile": {"steps": 2, "directory": f"/tmp/q/logs/profile-{name}"}} if profile else entry

    facts = {"date": "2026-12-07", "gpu": "NVIDIA H100 80GB HBM3", "vllm": "0.26.0", "torch": "2.11.0",
             "super_weights": "1:788:2427", "weights": "dummy (config only)", "planted": None, "tokens": 128, "rounds": {"1": 3, "32": 2},
             "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 49152,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}}
    calls = {1: [model("bf16", 100, 3000), model("plain-w4a16", 170, 4500, True), model("w4a16", 168, 4400, True),
                 model("bf16-nolora", 100, 3100), model("plain-fp8-dynamic", 150, 4000),
                 {"model": "fp8-dynamic", "skipped": "40 s left in the call's budget"}],
             2: [model("bf16", 110, 3000), model("fp8-dynamic", 160, 4200)]}
    for n, models in calls.items():
        (tmp_path / f"gpu8b_quant_side_by_side_call{n}.json").write_text(json.dumps({**facts, "models": models}))
    gemm = "void cutlass::device_kernel<cutlass::gemm::kernel::G..."
    common = [(gemm, "0.000us", "3.000ms", 192), (gemm, "0.000us", "1.000ms", 64), ("aten::mm", "1.000ms", "0.600ms", 2),
              ("nvjet_lm_head", "0.000us", "0.600ms", 2), ("cudaGraphLaunch", "2.000ms", "1.000us", 10)]
    for name, decode, extra in (("plain-w4a16", "8.000ms", ("triton_poi_fused_machete_mm_silu", "0.000us", "0.2ms", 64)),
                                ("w4a16", "8.200ms", ("triton_poi_fused_index_fill_silu", "0.000us", "4.000us", 2))):
        rows = [("execute_context_0(0)_generation_1(1)", "0.000us", decode, 1),
                ("execute_context_1(16)_generation_0(0)", "0.000us", "9.000ms", 1), *common, extra]
        (tmp_path / f"profile_decode_{name}.txt").write_text(_profile_table(rows))
    text = "\n".join(report.gpu8b_lines(tmp_path))
    assert "### Quantized decode side by side with plain vLLM" in text
    assert "Not measured yet (`benchmarks/quantized_decode.py`)" in text, "the side-by-side files are not the 8B run's"
    assert ("#   bash benchmarks/on_gpu.sh quantized_decode --config-only --repeat 2 --profile plain-w4a16 w4a16 \\\n"
            "#     --engine-option 'compilation_config={\"cudagraph_capture_sizes\":[1,32]}' \\\n"
            "#     bf16 plain-w4a16 w4a16 bf16-nolora plain-fp8-dynamic fp8-dynamic") in text
    assert ("cp <fetched>/gpu8b_quant_bf16_fp8-dynamic.json benchmarks/gpu/gpu8b_quant_side_by_side_call2.json"
            in text)
    assert "cp <fetched>/logs/profile-w4a16/profiler_out_0.txt benchmarks/gpu/profile_decode_w4a16.txt" in text
    assert "| `w4a16` | 168 / 170 | 4,400 / 4,444 | `bf16` | 1.68 / 1.68 | 1.47 / 1.47 | 0.99 / 0.99 | 0.98 / 0.98 |" in text
    assert "| `plain-w4a16` | 170 / 172 | 4,500 / 4,545 | `bf16-nolora` | 1.70 / 1.70 |" in text
    assert "`fp8-dynamic` skipped: 40 s left in the call's budget." in text
    assert ("`w4a16` (ours, protected, LoRA on) at least 0.97x `plain-w4a16` at 1 and 32 streams, both in call 1: "
            "0.99 / 0.99 at 1 and 0.98 / 0.98 at 32; met.") in text
    assert ("`fp8-dynamic` at least 0.97x `plain-fp8-dynamic`: not compared directly, as they ran in different calls; "
            "each against its own call's bf16 instead: `fp8-dynamic` (call 2) against `bf16`: 1.45 / 1.45 at 1") in text
    assert ("`w4a16` at least 1.8x bf16 at 1 stream: `w4a16` (call 1) 1.68 / 1.68x `bf16`, not met; plain vLLM "
            "itself: `plain-w4a16` (call 1) 1.70 / 1.70x `bf16-nolora`, not met.") in text
    assert "1 decode steps (row `execute_context_0(0)_generation_1(1)`) and 1 step with the prompt's prefill" in text
    assert "8.000 ms in `plain-w4a16`, 8.200 ms in `w4a16` (+0.200 ms, +2.5%)" in text
    assert "`cudaGraphLaunch` has 10 calls in `plain-w4a16` and 10 in `w4a16`" in text
    assert "In `w4a16` only" in text and "`triton_poi_fused_index_fill_silu` (2.0 µs, 1 a step)" in text
    assert "128 calls a step, 4 a layer over 32 layers) take 2.000 ms a step in `plain-w4a16`" in text
    assert "= 6,979,321,856 weights" in text and "= 3.599 GB. 3.599 GB in 2.000 ms is 1.80 TB/s." in text
    assert "the int4 GEMM reads at 54% of it" in text
    assert "(49,152 x 4096 x 2 bytes) = 1.34 TB/s" in text
    assert (tmp_path / "gpu8b_quant_side_by_side.png").is_file()
