"""The real default model (SmolLM2-135M-Instruct): its verified super weights matter, large weights don't."""

import json

import pytest

from compression.architectures import find_down_projections
from compression.detect import _largest_other_weights, zeroed
from compression.evaluation import load_eval_text, perplexity
from compression.models import load_model
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_super_weights_matter_and_large_weights_do_not(default_detection):
    checkpoint, report = default_detection
    assert report.super_weights, "the default model has super weights; none were confirmed"
    assert {w.row for w in report.super_weights} == {507}  # the residual channel of the super activation
    assert report.super_activations and abs(report.super_activations[0].value) > 1000
    model, tokenizer = load_model(checkpoint)
    by_name = {p.name: p for p in find_down_projections(model)}
    for w in report.super_weights:
        assert by_name[w.module].get(w.row, w.col) == w.value
    eval_ids = load_eval_text(tokenizer).ids  # the whole text
    assert eval_ids.numel() >= 10_000
    baseline = perplexity(model, eval_ids)
    with zeroed(by_name, report.super_weights):
        removed = perplexity(model, eval_ids)
    control_weights = _largest_other_weights(list(by_name.values()), report.super_weights, len(report.super_weights))
    assert min(abs(w.value) for w in control_weights) >= max(abs(w.value) for w in report.super_weights) * 0.5
    with zeroed(by_name, control_weights):
        control = perplexity(model, eval_ids)
    print(f"\nfull eval text ({eval_ids.numel()} tokens): baseline {baseline:.2f}, super weights removed "
          f"{removed:.1f} ({removed / baseline:.0f}x), {len(control_weights)} largest others removed {control:.2f} "
          f"({control / baseline:.2f}x)")
    assert removed / baseline >= 50
    assert control / baseline < 3


def test_detect_json_matches_schema(default_detection):
    _, report = default_detection
    done = run_cli("-q", "detect", "--json")  # reuses the report cached by the fixture
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["schema"] == "superweights.report/v1"
    assert data["prompt"] == report.prompt and data["model"]["sha256"] == report.model["sha256"]
    for w in data["super_weights"]:
        assert {"layer", "module", "row", "col", "value", "perplexity_ratio", "conditional_ratio"} <= set(w)
        assert w["module"].endswith("mlp.down_proj")  # the module; the weight is its .weight[row, col]
    assert [(w["layer"], w["row"], w["col"]) for w in data["super_weights"]] == \
        [(w.layer, w.row, w.col) for w in report.super_weights]
    assert {"layer", "channel", "value", "token_position"} <= set(data["super_activations"][0])


def test_detect_table_and_plot(default_detection, tmp_path):
    done = run_cli("-q", "detect", "--plot", str(tmp_path / "fig.png"))
    assert done.returncode == 0, done.stderr
    assert "super weights" in done.stdout and "507" in done.stdout
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
