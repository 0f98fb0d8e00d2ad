"""Detection on tiny real models with one planted super weight: found exactly, nothing else reported; a planted
massive activation that no single weight carries: reported on its own, and held out of activation quantization."""

import json
import math

import pytest
import torch

from superweights.compression.ablation import AblationScorer
from superweights.compression.architectures import find_down_projections
from superweights.compression.detect import (
    DetectionSettings,
    SuperWeight,
    SuperWeightReport,
    Verification,
    find_super_weights,
    published_agreement,
    zeroed,
)
from superweights.compression.evaluation import eval_windows, evaluate
from superweights.compression.quantize import ActivationConfig, held_out_channels, quantize_activation
from tests.tiny_models import ByteTokenizer, planted_gpt2, planted_llama, planted_spread_llama, sampled_text

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
    assert report.eval["removed_ratio"] > 10
    assert report.eval["control_ratio"] < 1.5 and report.eval["control_weights"] == 1
    assert report.eval["largest_control_ratio"] < 1.5 and report.eval["largest_control_weights"] == 50
    # the super activation: hidden channel 17, from layer 1 on, carried by the planted weight
    [activation] = report.super_activations
    assert activation.channel == 17 and activation.layer == 1 and activation.last_layer == 3
    assert abs(activation.value) > 100 and activation.carried_by_super_weight
    [feeder] = activation.feeders
    assert (feeder.layer, feeder.row, feeder.col, feeder.confirmed) == (1, 17, 99, True)
    assert abs(feeder.value_removed) < 0.01 * abs(activation.value)  # zeroing the weight removes the activation
    # weights are restored exactly
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_no_super_weight_reports_none_found():
    torch.manual_seed(0)
    model = planted_llama(value=0.0)  # everything planted except the weight itself
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model), settings=SETTINGS, progress=False)
    assert report.super_weights == []
    assert report.super_activations == []
    assert report.eval["removed_perplexity"] is None and report.eval["control_perplexity"] is None
    assert report.eval["largest_control_ratio"] < 1.5  # the paper's control is measured all the same


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
    with pytest.raises(RuntimeError), zeroed(by_name, [w]):
        assert by_name[w.module].get(w.row, w.col) == 0.0
        raise RuntimeError("boom")
    assert by_name[w.module].get(w.row, w.col) == 50.0


def test_an_activation_no_single_weight_carries_is_reported_and_held_out(capsys, monkeypatch):
    model = planted_spread_llama(layer=1, row=17, cols=tuple(range(100, 116)))
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model), prompt="Apple Inc. is a tech company.",
                                settings=SETTINGS, progress=False)
    assert report.super_weights == []  # no single removal matters
    assert len(report.rejected_candidates) == SETTINGS.max_candidates
    [activation] = report.super_activations
    assert (activation.channel, activation.layer) == (17, 1) and abs(activation.value) > 100
    assert not activation.carried_by_super_weight
    assert {(f.layer, f.row) for f in activation.feeders} == {(1, 17)}
    assert {f.col for f in activation.feeders} <= set(range(100, 116)) and len(activation.feeders) == 8
    for f in activation.feeders:  # each removal leaves the activation standing: 15/16 of it
        assert not f.confirmed and f.perplexity_ratio < 2
        assert 0.85 < f.value_removed / activation.value < 0.97
    assert 0.4 < activation.value_removed / activation.value < 0.6  # all eight zeroed: half of it is left
    # activation quantization holds out the channels through which it enters, with no super weight confirmed
    held = held_out_channels(report)
    assert held == {"model.layers.1.mlp.down_proj": [f.col for f in activation.feeders]}
    captured = {}
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    model(input_ids=torch.tensor([list(b"Apple Inc.")]))
    handle.remove()
    x = captured["x"]  # [1, S, 256]: the 16 planted channels fire at about 15, the rest near 0
    cols = held["model.layers.1.mlp.down_proj"]
    quantized = quantize_activation(x, ActivationConfig("int8", "tensor"), cols)
    torch.testing.assert_close(quantized[..., cols], x[..., cols], rtol=0, atol=0)
    from superweights.server.cli import print_report

    monkeypatch.setenv("COLUMNS", "200")  # rich's width when not on a terminal
    print_report(report)
    assert "no single weight carries it" in capsys.readouterr().out


@pytest.mark.parametrize("build", [planted_llama, planted_gpt2])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_removal_hooks_score_what_zeroed_weights_score(build, reuse_prefix):
    model = build()
    projections = find_down_projections(model)
    by_name = {p.name: p for p in projections}
    g = torch.Generator().manual_seed(1)
    windows = eval_windows(torch.randint(0, 256, (300,), generator=g), 128)  # 128, 128 and 44 tokens
    scorer = AblationScorer(model, projections, windows, reuse_prefix=reuse_prefix, max_batch_tokens=300)

    def weight(layer: int, row: int, col: int) -> SuperWeight:
        p = projections[layer]
        return SuperWeight(layer=layer, module=p.name, row=row, col=col, value=p.get(row, col),
                           input_magnitude=0.0, output_magnitude=0.0)

    sets = [[weight(1, 17, 99)], [weight(2, 3, 5), weight(3, 60, 7)], [weight(3, 1, 2)], [weight(1, 17, 99)]]
    got = scorer.losses(sets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for removed, losses in zip(sets, got):
        with zeroed(by_name, removed):
            expected = AblationScorer(model, projections, windows, reuse_prefix=False).baseline
        # subtracting w * x from an output of about 750 leaves float32 rounding that zeroing w does not
        torch.testing.assert_close(losses, expected, rtol=1e-3, atol=1e-3)
    assert scorer.tokens == got[0].numel() == 127 + 127 + 43
    # the first 50 tokens, scored from the baseline pass over the whole windows: as if scored on their own
    head = AblationScorer(model, projections, windows, reuse_prefix=False, head_tokens=50).head
    alone = AblationScorer(model, projections, [windows[0][:50]], reuse_prefix=reuse_prefix)
    assert head.tokens == alone.tokens == 49
    torch.testing.assert_close(head.baseline, alone.baseline, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(head.losses(sets), alone.losses(sets)):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)
    q = evaluate(model, torch.cat(windows), window=128)
    torch.testing.assert_close(scorer.baseline.mean().item(), math.log(q.perplexity), rtol=0, atol=1e-4)  # mean NLL
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_near_call_on_the_screen_is_measured_on_all_tokens():
    model = planted_llama(value=50.0)
    text = sampled_text(model)
    settings = DetectionSettings(eval_tokens=512, window=128, screen_tokens=32)
    verification = Verification(model, find_down_projections(model), text, settings)
    projections = find_down_projections(model)
    w = SuperWeight(layer=1, module=projections[1].name, row=17, col=99, value=50.0, input_magnitude=0.0,
                    output_magnitude=0.0)
    assert verification.verify([w]) == [w] and verification.escalated == 0 and w.tokens == 31  # far from x2
    # a threshold at the measured effect itself: the screen cannot tell, all 512 tokens decide
    near = DetectionSettings(eval_tokens=512, window=128, screen_tokens=32, min_effect=w.perplexity_ratio)
    again = Verification(model, projections, text, near)
    w2 = SuperWeight(layer=1, module=projections[1].name, row=17, col=99, value=50.0, input_magnitude=0.0,
                     output_magnitude=0.0)
    again.verify([w2])
    assert again.escalated == 1 and w2.tokens == 4 * 127


def test_a_report_from_before_reads_with_defaults():
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    old = json.loads(report.to_json())
    for key in ("published", "timings"):
        del old[key]
    for w in old["super_weights"] + old["rejected_candidates"]:
        del w["tokens"]
    a = old["super_activations"][0]
    # one entry per layer the activation persisted through, without feeders
    old["super_activations"] = [{k: a[k] for k in ("layer", "channel", "value", "token_position", "token")}
                                | {"layer": layer} for layer in (1, 2, 3)]
    again = SuperWeightReport.from_dict(old)
    assert again.super_weights[0].tokens is None and again.published is None and again.timings == {}
    [activation] = again.super_activations
    assert (activation.layer, activation.last_layer, activation.feeders) == (1, 3, [])
    assert held_out_channels(again) == {"model.layers.1.mlp.down_proj": [99]}


def test_published_agreement_coordinate_by_coordinate():
    from superweights.compression.published import Architecture, Coordinate, PublishedEntry, Source

    entry = PublishedEntry(id="tiny-llama", names=("org/tiny-llama",), coordinates=(Coordinate(1, 17, 99),
                           Coordinate(2, 3, 4)), architecture=Architecture("llama", 64, 256, 4),
                           source=Source("A paper", "Table 2", "https://example.org/paper"))
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4}
    found = [SuperWeight(layer=1, module="m", row=17, col=99, value=1.0, input_magnitude=0, output_magnitude=0),
             SuperWeight(layer=3, module="m", row=5, col=6, value=1.0, input_magnitude=0, output_magnitude=0)]
    result = published_agreement(config, "tiny-llama", found, entries=[entry])
    assert result["entry"] == "tiny-llama" and result["exact"] is False and result["source"] == "A paper, Table 2"
    assert [(c["layer"], c["row"], c["col"], c["published"], c["detected"]) for c in result["coordinates"]] == \
        [(1, 17, 99, True, True), (2, 3, 4, True, False), (3, 5, 6, False, True)]
    assert published_agreement(dict(config, hidden_size=128), "tiny-llama", found, entries=[entry]) is None
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    assert report.published is None  # no entry for a tiny random model


def test_print_report_reads_reports_from_before_and_declared_ones(capsys, monkeypatch):
    from superweights.server.cli import print_report

    monkeypatch.setenv("COLUMNS", "200")
    weight = {"layer": 1, "module": "model.layers.1.mlp.down_proj", "row": 17, "col": 99, "value": 50.0,
              "input_magnitude": 15.0, "output_magnitude": 750.0, "perplexity_removed": 9e9,
              "perplexity_ratio": 1e9, "conditional_ratio": 1e9}
    old = {"schema": "superweights.report/v1", "model": {"architecture": "LlamaForCausalLM", "num_layers": 4,
           "hidden_size": 64}, "prompt": "p", "created_at": "", "settings": {"min_effect": 2.0}, "layer_stats": [],
           "eval": {"text": "t", "sha256": "", "tokens": 512, "window": 128, "baseline_perplexity": 2.0,
                    "removed_perplexity": 2e9, "control_perplexity": 2.2, "control_weights": 1},
           "super_weights": [weight], "rejected_candidates": [],
           "super_activations": [{"layer": layer, "channel": 17, "value": 750.0, "token_position": 0, "token": "A"}
                                 for layer in (1, 2, 3)]}
    print_report(SuperWeightReport.from_dict(old))
    out = capsys.readouterr().out
    assert "x1,000,000,000.0" in out and "x1.10" in out and "1-3" in out
    declared = dict(old, prompt="", settings={"declared": ["layer 1 [17, 99]"]}, super_activations=[],
                    eval={"text": "", "sha256": "", "tokens": 0, "window": 512, "baseline_perplexity": None,
                          "removed_perplexity": None, "control_perplexity": None, "control_weights": 0},
                    super_weights=[dict(weight, perplexity_removed=None, perplexity_ratio=None,
                                        conditional_ratio=None)])
    print_report(SuperWeightReport.from_dict(declared))  # no evaluation, no ratios: printed as "-"
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out


def test_offline_placement_follows_the_machine():
    """auto: the GPU in bfloat16 when torch sees one, else the CPU in float32; a GPU asked for and absent is an
    error a person can act on."""
    from superweights.compression.errors import UserError
    from superweights.compression.models import offline_placement

    cuda = torch.cuda.is_available()
    assert offline_placement() == (("cuda", "bfloat16") if cuda else ("cpu", "float32"))
    assert offline_placement("cpu") == ("cpu", "float32")
    assert offline_placement("cpu", "bfloat16") == ("cpu", "bfloat16")
    if not cuda:
        with pytest.raises(UserError, match="sees no GPU"):
            offline_placement("cuda")
    with pytest.raises(UserError, match="dtype one of"):
        offline_placement("cpu", "int8")


def test_detection_in_bfloat16_finds_the_same_weight():
    """The offline dtype is the caller's: in bfloat16 the planted weight is found at the same place (its value
    rounded to bfloat16), as on a GPU."""
    model = planted_llama(layer=1, row=17, col=99, value=50.0).to(torch.bfloat16)
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model), settings=SETTINGS, progress=False)
    assert [(w.layer, w.row, w.col, w.value) for w in report.super_weights] == [(1, 17, 99, 50.0)]
    assert set(report.timings["memory_mib"]) == {"scan", "baseline", "verify", "controls", "activations"}
    assert all(v > 0 for v in report.timings["memory_mib"].values())
