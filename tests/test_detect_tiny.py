"""Detection on tiny real models with one planted super weight: found exactly, nothing else reported; a planted
massive activation that no single weight carries: reported on its own, and held out of activation quantization."""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from superweights.compression.ablation import AblationScorer
from superweights.compression.architectures import find_down_projections
from superweights.compression.detect import (
    DetectionSettings,
    Verification,
    find_super_weights,
    published_agreement,
    zeroed,
)
from superweights.compression.evaluation import eval_windows, evaluate
from superweights.compression.quantize import ActivationConfig, held_out_channels, quantize_activation
from superweights.compression.report import (
    DeclaredSettings,
    EvalFacts,
    PublishedAgreement,
    ReportFormatError,
    SuperWeight,
    SuperWeightReport,
)
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
    e = report.evaluation
    assert e.removed_ratio > 10 and e.control_ratio < 1.5 and e.control_weights == 1
    assert e.largest_control_ratio < 1.5 and e.largest_control_weights == 50
    assert (e.device, e.dtype, report.model.name) == ("cpu", "float32", "")  # a model built here, not a checkpoint
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
    assert report.evaluation.removed_perplexity is None and report.evaluation.control_perplexity is None
    assert report.evaluation.largest_control_ratio < 1.5  # the paper's control is measured all the same


def test_report_json_round_trip():
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    again = SuperWeightReport.from_dict(json.loads(report.to_json()))
    assert again == report
    assert report.super_weights[0].parameter == "model.layers.1.mlp.down_proj.weight"


def _layouts_from_before(report: SuperWeightReport) -> dict[str, dict]:
    """The report's JSON as earlier revisions wrote it, one change each."""
    def changed(edit) -> dict:
        d = json.loads(report.to_json())
        edit(d)
        return d

    def per_layer_activations(d: dict) -> None:  # one entry per layer an activation persisted through, no feeders
        a = d["super_activations"][0]
        d["super_activations"] = [{k: a[k] for k in ("channel", "value", "token_position", "token")} | {"layer": n}
                                  for n in range(a["layer"], a["last_layer"] + 1)]

    return {
        "no timings": changed(lambda d: d.pop("timings")),
        "no tokens per weight": changed(lambda d: [w.pop("tokens") for w in d["super_weights"]]),
        "perplexities without ratios": changed(lambda d: [d["eval"].pop(f"{k}_ratio") for k in ("removed", "control")]),
        "no intermediate size": changed(lambda d: d["model"].pop("intermediate_size")),
        "per-layer activations": changed(per_layer_activations),
        "a key this version does not know": changed(lambda d: d["eval"].update(perplexity_windows=4)),
        "another schema": changed(lambda d: d.update(schema="superweights.report/v0")),
    }


def test_a_report_in_an_earlier_layout_is_refused():
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    for what, old in _layouts_from_before(report).items():
        with pytest.raises(ReportFormatError, match="superweights.report/v1"):
            SuperWeightReport.from_dict(old)
            pytest.fail(f"read a report with {what}")


def test_a_report_cached_by_an_earlier_revision_is_recomputed(tmp_path, caplog, monkeypatch):
    """The revision is in the cache key: an earlier revision's report is never looked up. One found under this
    revision's key all the same (copied by hand) is ignored with a warning, and detection runs again."""
    from superweights.compression import pipeline
    from superweights.compression.models import Checkpoint

    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    checkpoint = Checkpoint(path=tmp_path, name="tiny", source=str(tmp_path), sha256="0" * 64)
    key = pipeline._report_key(checkpoint, "p", SETTINGS, None, ("cpu", "float32"))
    monkeypatch.setattr(pipeline, "DETECTOR_REVISION", pipeline.DETECTOR_REVISION - 1)
    assert pipeline._report_key(checkpoint, "p", SETTINGS, None, ("cpu", "float32")) != key
    path = tmp_path / f"{key}.json"
    path.write_text(json.dumps(_layouts_from_before(report)["per-layer activations"]))
    assert pipeline._load_cached(path) is None
    assert "ignoring unreadable cached report" in caplog.text
    path.write_text(report.to_json())
    assert pipeline._load_cached(path) == report


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
    measured, confirmed = verification.verify([w])
    assert confirmed == measured and verification.escalated == 0 and measured[0].tokens == 31  # far from x2
    assert w.tokens is None  # the candidate as found is left as it was: verify returns measured copies
    # a threshold at the measured effect itself: the screen cannot tell, all 512 tokens decide
    near = DetectionSettings(eval_tokens=512, window=128, screen_tokens=32, min_effect=measured[0].perplexity_ratio)
    again = Verification(model, projections, text, near)
    (remeasured,), _ = again.verify([w])
    assert again.escalated == 1 and remeasured.tokens == 4 * 127


def test_published_agreement_coordinate_by_coordinate():
    from superweights.compression.published import Architecture, Coordinate, PublishedEntry, Source

    entry = PublishedEntry(id="tiny-llama", names=("org/tiny-llama",), coordinates=(Coordinate(1, 17, 99),
                           Coordinate(2, 3, 4)), architecture=Architecture("llama", 64, 256, 4),
                           source=Source("A paper", "Table 2", "https://example.org/paper"))
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4}
    found = [SuperWeight(layer=1, module="m", row=17, col=99, value=1.0, input_magnitude=0, output_magnitude=0),
             SuperWeight(layer=3, module="m", row=5, col=6, value=1.0, input_magnitude=0, output_magnitude=0)]
    result = published_agreement(config, "tiny-llama", found, entries=[entry])
    assert result.entry == "tiny-llama" and result.exact is False and result.source == "A paper, Table 2"
    assert [(c.layer, c.row, c.col, c.published, c.detected) for c in result.coordinates] == \
        [(1, 17, 99, True, True), (2, 3, 4, True, False), (3, 5, 6, False, True)]
    assert PublishedAgreement.from_dict(json.loads(json.dumps(asdict(result)))) == result
    assert published_agreement(dict(config, hidden_size=128), "tiny-llama", found, entries=[entry]) is None
    model = planted_llama()
    report = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    assert report.published is None  # no entry for a tiny random model


def test_a_declared_report_prints_and_round_trips(capsys, monkeypatch):
    """Declared super weights measure nothing: the report says so, prints its ratios as "-", and reads back."""
    from superweights.server.cli import print_report

    monkeypatch.setenv("COLUMNS", "200")
    model = planted_llama()
    found = find_super_weights(model, ByteTokenizer(), sampled_text(model, 256), settings=SETTINGS, progress=False)
    unmeasured = [replace(w, perplexity_removed=None, perplexity_ratio=None, conditional_ratio=None, tokens=None)
                  for w in found.super_weights]
    declared = replace(found, prompt="", model=replace(found.model, declared=True),
                       evaluation=EvalFacts.unmeasured(), settings=DeclaredSettings(["layer 1 [17, 99]"]),
                       super_weights=unmeasured, rejected_candidates=[], super_activations=[], layer_stats=[])
    data = json.loads(declared.to_json())
    assert data["model"]["declared"] is True and data["settings"] == {"declared": ["layer 1 [17, 99]"]}
    assert data["eval"]["baseline_perplexity"] is None
    again = SuperWeightReport.from_dict(data)
    assert again == declared and again.model.declared and again.min_effect == 2.0
    print_report(again)
    out = capsys.readouterr().out
    assert "declared (--super-weights), not detected" in out and "+50.000000" in out
    row = next(line for line in out.splitlines() if "+50.000000" in line)
    assert "eval:" not in out and row.split()[-2:] == ["-", "-"]  # no ratio measured: alone, conditional as "-"


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
