"""Tensor and pipeline parallelism through the server on vLLM's own CPU executors: real ranks and real stages, one
core each (the server binds them, VLLM_CPU_OMP_THREADS_BIND), nothing simulated.

- A small Llama with a planted super weight (tests.tiny_models.servable_planted_llama: 4 heads, 2 KV heads, so
  it splits over two ranks), found by our own detection, at tensor parallel size 1 and 2, and its protected w8a8
  artifact at 2: the probe answers from the rank that holds the weight's input column and equals TP=1's, base
  greedy tokens equal TP=1's, the removal arm changes the output as it does at TP=1.
- The default model at pipeline parallel size 2 (it has 9 attention heads: no TP=2) against the one-process
  server of conftest: the probe answers from the stage that holds layer 11.
- Qwen2.5-Coder-0.5B with its super weight declared, at TP=2.
- Ray: vLLM's CPU platform has no Ray support, so `distributed_executor_backend=ray` is refused in one line; and an
  engine core that dies starting ends the server in one line.

A campaign (about 15 minutes here): `bash scripts/test.sh -m campaign tests/test_parallel.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli, serving, start_server
from tests.tiny_models import save_checkpoint, servable_planted_llama

pytestmark = [pytest.mark.campaign, pytest.mark.slow]

PLANTED = {"layer": 1, "row": 17, "col": 300}  # intermediate 512: rank 1 of 2 holds input columns 256-511
PROMPT = "Call me Ishmael. Some years ago"
GREEDY = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
QWEN = "qwen2.5-coder-0.5b-instruct"
QWEN_SUPER_WEIGHT = "2:62:1980"  # its detected super weight (docs/detection.md)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from superweights.compression.evaluation import DEFAULT_EVAL_TEXT

    directory = tmp_path_factory.mktemp("planted") / "planted-llama"
    english = DEFAULT_EVAL_TEXT.read_text()[:20000]  # the evaluation text's start: its byte frequencies
    save_checkpoint(servable_planted_llama(english, **PLANTED), directory)
    return directory


@pytest.fixture(scope="class")
def planted_servers(planted, tmp_path_factory):
    """The planted model at TP=1 and TP=2, and its protected w8a8 artifact at TP=2, for one class of tests: each
    class's servers stop before the next class starts its own (all of them at once do not fit in 24 GiB)."""
    logs = tmp_path_factory.mktemp("parallel")
    artifact = logs / "planted-w8a8"
    done = run_cli("-q", "compress", str(planted), "--scheme", "w8a8", "-o", str(artifact), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    tp2 = ("--engine-arg", "tensor_parallel_size=2")
    with serving({"tp1": start_server(logs / "tp1.log", str(planted)),
                  "tp2": start_server(logs / "tp2.log", str(planted), *tp2),
                  "artifact_tp2": start_server(logs / "artifact_tp2.log", str(artifact), *tp2)}) as running:
        yield running


def greedy(server, variant: str = "") -> list[int]:
    with server.client() as client:
        return client.generate(PROMPT, variant=variant, **GREEDY)["token_ids"]


def probed_from(server) -> dict[tuple[int, int], str]:
    """(row, col) -> the workers that answered the start-up probe, from the server's log."""
    found = re.findall(r"probe: \S+\[(\d+), (\d+)\] \S+ from worker ([\d, ]+) of (\d+)", server.log.read_text())
    return {(int(r), int(c)): f"{w} of {n}" for r, c, w, n in found}


class TestPlantedLlama:
    """The planted model and its artifact over two ranks."""

    def test_tensor_parallel_serves_what_one_rank_serves(self, planted_servers):
        tp1, tp2 = planted_servers["tp1"], planted_servers["tp2"]
        with tp1.client() as one, tp2.client() as two:
            info = two.model_info()
            assert (info.tensor_parallel_size, info.pipeline_parallel_size, info.executor) == (2, 1, "mp")
            found_1, found_2 = one.super_weights().super_weights, two.super_weights().super_weights
        assert [(w.layer, w.row, w.col) for w in found_2] == [(PLANTED["layer"], PLANTED["row"], PLANTED["col"])]
        assert [(w.layer, w.row, w.col) for w in found_1] == [(w.layer, w.row, w.col) for w in found_2]
        assert found_2[0].engine_value == pytest.approx(found_1[0].engine_value, rel=1e-5)
        assert found_2[0].engine_value == pytest.approx(found_2[0].value, rel=1e-4)
        assert probed_from(tp2) == {(PLANTED["row"], PLANTED["col"]): "1 of 2"}  # the rank with input column 300
        base = greedy(tp1)
        assert greedy(tp2) == base
        removed = greedy(tp2, "no_super_weights")
        assert removed != base and removed == greedy(tp1, "no_super_weights")


    def test_protected_artifact_is_corrected_on_the_rank_that_holds_the_column(self, planted_servers):
        """The w8a8 artifact at TP=2 passed the start-up self-check (perplexity within 2% of its offline evaluation,
        removal effect as reported): each rank added only the super-weight columns of its own input shard, and the
        probe read the exact float32 column through the quantized kernel on rank 1."""
        served = planted_servers["artifact_tp2"]
        with served.client() as client:
            info = client.model_info()
            weights = client.super_weights().super_weights
            compare = client.compare(PROMPT, **GREEDY)
        assert "w8a8" in info.quantization and "protected" in info.quantization and info.tensor_parallel_size == 2
        assert weights[0].engine_value == pytest.approx(weights[0].value, rel=1e-4)
        assert probed_from(served) == {(PLANTED["row"], PLANTED["col"]): "1 of 2"}
        assert "self-check: base perplexity" in served.log.read_text()
        base, removed = compare.arms
        assert base.token_ids != removed.token_ids


@pytest.fixture(scope="class")
def pipeline(tmp_path_factory, servers):
    """The default model in two pipeline stages (layers 0-14 and 15-29)."""
    with serving({"pp2": start_server(tmp_path_factory.mktemp("pp") / "pp2.log", "--engine-arg",
                                      "pipeline_parallel_size=2")}) as running:
        yield running["pp2"], servers["auth"]


class TestPipeline:
    """The default model in two stages."""

    def test_pipeline_parallel_serves_what_one_stage_serves(self, pipeline):
        """Start-up self-check passed through both stages; every RPC answers as the one-process server's."""
        pp2, one = pipeline
        with pp2.client() as two, one.client() as single:
            info = two.model_info()
            assert (info.tensor_parallel_size, info.pipeline_parallel_size) == (1, 2)
            weights_2, weights_1 = two.super_weights().super_weights, single.super_weights().super_weights
            compare_2 = two.compare("The capital of France is", max_tokens=8, temperature=0.0)
            compare_1 = single.compare("The capital of France is", max_tokens=8, temperature=0.0)
        assert [w.engine_value for w in weights_2] == pytest.approx([w.engine_value for w in weights_1], rel=1e-5)
        assert set(probed_from(pp2).values()) == {"0 of 2"}  # layer 11 is in the first stage
        assert [list(a.token_ids) for a in compare_2.arms] == [list(a.token_ids) for a in compare_1.arms]
        assert compare_2.arms[0].token_ids != compare_2.arms[1].token_ids
        assert greedy(pp2) == greedy(one)


@pytest.fixture(scope="class")
def qwen_tp2(tmp_path_factory):
    with serving({"qwen": start_server(tmp_path_factory.mktemp("qwen") / "qwen_tp2.log", QWEN, "--super-weights",
                                       QWEN_SUPER_WEIGHT, "--engine-arg", "tensor_parallel_size=2",
                                       "--canary-interval", "0")}) as running:
        yield running["qwen"]


class TestQwen:
    """Qwen2.5-Coder-0.5B over two ranks."""

    def test_qwen_at_tensor_parallel_two_with_declared_super_weights(self, qwen_tp2):
        with qwen_tp2.client() as client:
            info = client.model_info()
            (weight,) = client.super_weights().super_weights
            compare = client.compare("def fibonacci(n):", max_tokens=12, temperature=0.0)
        assert info.tensor_parallel_size == 2
        assert (weight.layer, weight.row, weight.col) == (2, 62, 1980)
        assert weight.engine_value == pytest.approx(weight.value, rel=1e-4)  # read from the checkpoint, computed by TP
        assert probed_from(qwen_tp2) == {(62, 1980): "0 of 2"}  # intermediate 4864: rank 0 holds columns 0-2431
        base, removed = compare.arms
        # zeroing this weight barely moves Qwen's perplexity (x0.99, docs/detection.md: declared, not detected), so
        # the greedy tokens may stay; the removal arm still computes something else: its distributions differ
        assert base.text.strip() and removed.text.strip() and compare.divergence[0].mean_kl_topk > 1e-6
        print(f"\nQwen TP=2: base {base.text!r}; removal arm KL {compare.divergence[0].mean_kl_topk:.2e}, first "
              f"differing token {compare.divergence[0].first_differing_token}")


def test_ray_executor_on_the_cpu_engine_is_one_line():
    """vLLM's CPU platform has no Ray support (its engine core dies starting: "current platform cpu does not support
    ray"), so Ray cannot run here for real: the server says so in one line, exit 2, before it resolves the model."""
    done = run_cli("-q", "serve", "--engine-arg", "tensor_parallel_size=2", "--engine-arg",
                   "distributed_executor_backend=ray", timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("superweights: error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "cpu platform has no Ray support" in errors[0], done.stderr[-2000:]


@pytest.mark.parametrize("front_ends", ["1", "2"])
def test_an_engine_that_dies_starting_ends_in_one_line(monkeypatch, front_ends):
    """An engine core that dies during start-up (here: asked for a KV cache larger than the machine's memory, which
    vLLM's CPU worker refuses) ends the server with one line pointing at the engine's own log lines, not vLLM's
    traceback: in one process, and with several front ends (vLLM's launcher)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")  # GiB; the server keeps a value the user set
    ports = ("--port", str(free_port()), "--metrics-port", str(free_port()))
    done = run_cli("-q", "serve", *ports, "--front-ends", front_ends, timeout=600)
    from superweights.server import app

    errors = [line for line in done.stderr.splitlines() if line.startswith("superweights: error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "engine core failed to start" in errors[0], \
        done.stderr[-3000:]
    assert "less than requested memory for kv" in done.stderr  # the cause, in vLLM's own log lines above it
    # vLLM's engine core process prints its traceback (the cause); none of the server's own frames is printed
    server_code = str(Path(app.__file__).parent)
    assert f'File "{server_code}' not in done.stderr, done.stderr[-3000:]
