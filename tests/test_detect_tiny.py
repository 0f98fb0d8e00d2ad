"""Detection on tiny real models with one planted super weight: found exactly, nothing else reported."""

import json

import pytest
import torch

from compression.architectures import find_down_projections
from compression.detect import DetectionSettings, SuperWeightReport, find_super_weights, zeroed
from tests.tiny_models import ByteTokenizer, planted_gpt2, planted_llama, sampled_text

SETTINGS = DetectionSettings(eval_tokens=512, window=128)


@pytest.mark.parametrize("build, module", [
    (planted_llama, "model.layers.1.mlp.down_proj"),
    (planted_gpt2, "transformer.h.1.mlp.c_proj"),
])
def test_planted_super_weight_is_found_exactly(build, module):
    model = build(layer=1, row=17, col=99, value=50.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model), prompt="Apple Inc. is a tech company.",
                                settings=SETTINGS, progress=False)
    assert [(w.layer, w.module, w.row, w.col, w.value) for w in report.super_weights] == [(1, module, 17, 99, 50.0)]
    assert report.rejected_candidates == []
    assert report.super_weights[0].perplexity_ratio > 10
    assert report.eval["control_perplexity"] / report.eval["baseline_perplexity"] < 1.5
    # the super activation: hidden channel 17, from layer 1 on
    assert report.super_activations and {a.channel for a in report.super_activations} == {17}
    assert report.super_activations[0].layer == 1 and abs(report.super_activations[0].value) > 100
    # weights are restored exactly
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_no_super_weight_reports_none_found():
    torch.manual_seed(0)
    model = planted_llama(value=0.0)  # everything planted except the weight itself
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model), settings=SETTINGS, progress=False)
    assert report.super_weights == []
    assert report.super_activations == []
    assert report.eval["removed_perplexity"] is None


def test_report_json_round_trip():
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    again = SuperWeightReport.from_dict(json.loads(report.to_json()))
    assert again == report
    assert report.super_weights[0].parameter == "model.layers.1.mlp.down_proj.weight"


def test_a_report_cached_with_parameter_names_reads_as_module_names():
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    old = json.loads(report.to_json())
    for entry in old["super_weights"] + old["rejected_candidates"] + old["layer_stats"]:
        entry["module"] += ".weight"  # how reports were written before
    assert SuperWeightReport.from_dict(old) == report


def test_zeroed_restores_on_error():
    model = planted_llama()
    by_name = {p.name: p for p in find_down_projections(model)}
    w = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS,
                           progress=False).super_weights[0]
    with pytest.raises(RuntimeError):
        with zeroed(by_name, [w]):
            assert by_name[w.module].get(w.row, w.col) == 0.0
            raise RuntimeError("boom")
    assert by_name[w.module].get(w.row, w.col) == 50.0
