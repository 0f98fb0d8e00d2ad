"""The real default model (SmolLM2-135M-Instruct): its verified super weights matter, large weights don't."""

import json

import pytest

from superweights.compression.architectures import find_down_projections
from superweights.compression.detect import _largest_other_weights, zeroed
from superweights.compression.evaluation import load_eval_text, perplexity
from superweights.compression.models import load_model
from superweights.compression.report import SuperWeightReport
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
HELD_OUT = 4096  # tokens of the evaluation text after those detection scored: the claims, checked on new text


def test_verdicts_activation_and_controls(default_detection):
    _, report = default_detection
    # the verdicts: two super weights in row 507 of layer 11; a layer-28 weight in the same row does not matter
    assert [(w.layer, w.row, w.col) for w in report.super_weights] == [(11, 507, 1229), (11, 507, 1487)]
    assert [(w.layer, w.row, w.col) for w in report.rejected_candidates] == [(28, 507, 678)]
    e = report.evaluation
    assert e.bos is False and e.tokens == 1024 and e.window == 512  # SmolLM2's tokenizer adds no BOS
    assert e.removed_ratio > 1000 and e.control_ratio < 2
    assert e.largest_control_weights == 50 and 2 < e.largest_control_ratio < e.removed_ratio / 100
    # the super activation, on its own: channel 507 from layer 11, carried by the two super weights
    [activation] = report.super_activations
    assert (activation.channel, activation.layer, activation.token_position) == (507, 11, 0)
    assert abs(activation.value) > 10_000 and activation.last_layer >= 27 and activation.carried_by_super_weight
    assert [(f.col, f.confirmed) for f in activation.feeders] == [(1229, True), (1487, True)]
    assert abs(activation.value_removed) < 0.05 * abs(activation.value)
    assert report.published is None  # SmolLM2 is not in the directory
    print(f"\ndetection phases (s): {report.timings}")
    assert report.timings["escalated_verdicts"] == 0 and report.timings["evaluation_forwards"] <= 8


def test_super_weights_matter_and_large_weights_do_not(default_detection):
    checkpoint, report = default_detection
    assert report.super_weights, "the default model has super weights; none were confirmed"
    assert {w.row for w in report.super_weights} == {507}  # the residual channel of the super activation
    model, tokenizer = load_model(checkpoint)
    by_name = {p.name: p for p in find_down_projections(model)}
    for w in report.super_weights:
        assert by_name[w.module].get(w.row, w.col) == w.value
    text = load_eval_text(tokenizer)
    assert text.ids.numel() >= 10_000 and text.bos_id is None
    # the report's baseline is what evaluation computes on its tokens and windows (the server's self-check)
    seen = report.evaluation.tokens
    assert perplexity(model, text.ids[:seen], report.evaluation.window) == \
        pytest.approx(report.evaluation.baseline_perplexity, rel=1e-4)
    eval_ids = text.ids[seen: seen + HELD_OUT]  # text that detection never scored
    baseline = perplexity(model, eval_ids)
    with zeroed(by_name, report.super_weights):
        removed = perplexity(model, eval_ids)
    projections = list(by_name.values())
    control_weights = _largest_other_weights(projections, report.super_weights, len(report.super_weights))
    assert min(abs(w.value) for w in control_weights) >= max(abs(w.value) for w in report.super_weights) * 0.5
    with zeroed(by_name, control_weights):
        control = perplexity(model, eval_ids)
    with zeroed(by_name, _largest_other_weights(projections, report.super_weights, 50)):
        largest = perplexity(model, eval_ids)
    print(f"\nheld-out text ({eval_ids.numel()} tokens after the first {seen}): baseline {baseline:.2f}, super "
          f"weights removed {removed:.1f} ({removed / baseline:.0f}x), {len(control_weights)} largest others removed "
          f"{control:.2f} ({control / baseline:.2f}x), 50 largest others removed {largest:.2f} "
          f"({largest / baseline:.1f}x)")
    assert removed / baseline >= 50
    assert control / baseline < 3
    assert largest / baseline < removed / baseline / 100  # the paper's control: far below the super weights


def test_detect_json_matches_schema(default_detection):
    _, report = default_detection
    done = run_cli("-q", "detect", "--json")  # reuses the report cached by the fixture
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["schema"] == "superweights.report/v1"
    assert data["prompt"] == report.prompt and data["model"]["sha256"] == report.model.sha256
    for w in data["super_weights"]:
        assert {"layer", "module", "row", "col", "value", "perplexity_ratio", "conditional_ratio", "tokens"} <= set(w)
        assert w["module"].endswith("mlp.down_proj")  # the module; the weight is its .weight[row, col]
    assert [(w["layer"], w["row"], w["col"]) for w in data["super_weights"]] == \
        [(w.layer, w.row, w.col) for w in report.super_weights]
    assert {"layer", "channel", "value", "token_position", "last_layer", "feeders", "value_removed",
            "perplexity_ratio_removed", "carried_by_super_weight"} <= set(data["super_activations"][0])
    assert {"bos", "bos_token_id", "screen_tokens", "removed_ratio", "control_ratio", "largest_control_weights",
            "largest_control_ratio"} <= set(data["eval"])
    assert list(data) == ["model", "prompt", "created_at", "eval", "super_weights", "rejected_candidates",
                          "super_activations", "layer_stats", "settings", "schema", "published", "timings"]
    assert list(data["model"]) == ["architecture", "num_layers", "hidden_size", "intermediate_size", "model_type",
                                   "name", "source", "sha256"]
    assert SuperWeightReport.from_dict(data).to_dict() == data  # every key read back, none added


def test_detect_table_and_plot(default_detection, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the terminal a new user has: every number whole, nothing past column 80
    done = run_cli("-q", "detect", "--plot", str(tmp_path / "fig.png"))
    assert done.returncode == 0, done.stderr
    assert "super weights" in done.stdout and "507" in done.stdout
    table = [line for line in done.stdout.splitlines() if not line.startswith("plot written to")]  # a path, whole
    assert max(len(line) for line in table) <= 80 and "\u2026" not in done.stdout
    assert all(f"{w.value:+.6f}" in done.stdout for w in default_detection[1].super_weights)
    assert "paper's control, the 50 largest" in done.stdout and "size-matched control" in done.stdout
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
