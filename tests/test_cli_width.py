"""The CLI's tables as a new user sees them in an 80-column terminal: no line past column 80, no number cut with an
ellipsis, long texts (arm texts, feeders) below the tables. Real reports of tiny planted models; a real
CompareGenerationsResponse."""

import io
from dataclasses import replace

import pytest
from rich.console import Console

from superweights.compression.detect import find_super_weights
from superweights.server.cli import print_compare, print_report
from superweights.v1 import superweights_pb2 as pb
from tests.test_detect_tiny import SETTINGS
from tests.tiny_models import ByteTokenizer, planted_gpt2, planted_llama, planted_spread_llama, sampled_text

PROMPT = "Apple Inc. is a tech company."


def render(show, *args) -> str:
    """What `show` prints on an 80-column terminal."""
    console = Console(width=80, record=True, file=io.StringIO())
    show(*args, console=console)
    return console.export_text()


def assert_fits(out: str) -> None:
    assert [line for line in out.splitlines() if len(line) > 80] == []
    assert "\u2026" not in out


def times(ratio: float) -> str:
    """The CLI's perplexity ratios: x1.06, x21,433.6, x1.5e+09."""
    return f"x{ratio:.2f}" if ratio < 10 else f"x{ratio:,.1f}" if ratio < 1e6 else f"x{ratio:.1e}"


def detected(build):
    model = build()
    return find_super_weights(model, ByteTokenizer(), sampled_text(model), prompt=PROMPT, settings=SETTINGS,
                              progress=False)


@pytest.fixture(scope="module")
def llama_report():
    return detected(planted_llama)


@pytest.fixture(scope="module")
def gpt2_report():
    return detected(planted_gpt2)


@pytest.mark.parametrize("name, module", [("llama_report", "model.layers.L.mlp.down_proj"),
                                          ("gpt2_report", "transformer.h.L.mlp.c_proj")])
def test_a_report_fits_80_columns_with_every_number_whole(request, name, module):
    report = request.getfixturevalue(name)
    out = render(print_report, report)
    assert_fits(out)
    assert f"super weights in {module}" in out  # the module said once, above the table
    [w] = report.super_weights
    rows = [line.split() for line in out.splitlines()]
    assert ["1", "17", "99", "+50.000000", f"{w.input_magnitude:.1f}", f"{w.output_magnitude:.1f}",
            times(w.perplexity_ratio), times(w.conditional_ratio)] in rows
    assert f"all super weights removed: perplexity {times(report.evaluation.removed_ratio)};" in out
    [a] = report.super_activations
    assert f"{a.layer}-{a.last_layer}" in out and f"{a.value:+.1f}" in out and f"{a.value_removed:+.1f}" in out


def test_large_numbers_of_a_large_model_fit(llama_report):
    """Coordinates, magnitudes and ratios of the width an 8B model has; one verdict remeasured on all tokens."""
    [w] = llama_report.super_weights
    weights = [replace(w, row=4062, col=14336, value=-0.01234567, input_magnitude=40123.94,
                       output_magnitude=123474.94, perplexity_ratio=21433.6, conditional_ratio=21433.6, tokens=127),
               replace(w, layer=31, module="model.layers.31.mlp.down_proj", row=788, col=2427, value=2.34375,
                       input_magnitude=9876.5, output_magnitude=5432.1, perplexity_ratio=1.5e9,
                       conditional_ratio=2633.456, tokens=1024)]
    report = replace(llama_report, super_weights=weights,
                     evaluation=replace(llama_report.evaluation, removed_ratio=21433.6))
    out = render(print_report, report)
    assert_fits(out)
    rows = [line.split() for line in out.splitlines()]
    assert ["1", "4062", "14336", "-0.012346", "40123.9", "123474.9", "x21,433.6", "x21,433.6", "127"] in rows
    assert ["31", "788", "2427", "+2.343750", "9876.5", "5432.1", "x1.5e+09", "x2,633.5", "1024"] in rows
    assert "31.mlp" not in out  # one module name, said once above the table
    assert "all super weights removed: perplexity x21,433.6" in out


def test_an_activation_no_single_weight_carries_lists_its_feeders_below(monkeypatch, capsys):
    report = detected(planted_spread_llama)
    monkeypatch.setenv("COLUMNS", "80")  # what the real command sees: rich takes its width from $COLUMNS
    print_report(report)
    out = capsys.readouterr().out
    assert_fits(out)
    assert "no super weights found" in out and "channel 17: no single weight carries it" in out
    below = [line.split() for line in out[out.index("channel 17: no single"):].splitlines()]
    [a] = report.super_activations
    for f in a.feeders:  # one row each, in a table below the activations'
        assert [str(f.layer), str(f.row), str(f.col), f"{f.value:+.6f}", "no", f"{f.value_removed:+.1f}",
                times(f.perplexity_ratio)] in below
    rows = [line.split() for line in out.splitlines()]
    for w in report.rejected_candidates:
        assert [str(w.layer), str(w.row), str(w.col), f"{w.value:+.6f}", f"{w.input_magnitude:.1f}",
                f"{w.output_magnitude:.1f}", times(w.perplexity_ratio), times(w.conditional_ratio)] in rows


def test_compare_fits_80_columns_with_the_texts_below_the_table():
    texts = {"base": " Paris. It is the capital and the largest city of France,\nhome to the Louvre.",
             "no_super_weights": " the the the, , of the and the of the the the the the,\n\n the , the the",
             "scaled_1.5": " Paris, the city of [lights] and of the Eiffel Tower,\nbuilt in 1889 for the fair."}
    response = pb.CompareGenerationsResponse(
        arms=[pb.ArmResult(variant="base", text=texts["base"], finish_reason="length", stop_word_mass=0.2134),
              pb.ArmResult(variant="no_super_weights", text=texts["no_super_weights"], finish_reason="length",
                           stop_word_mass=0.8123),
              pb.ArmResult(variant="scaled_1.5", text=texts["scaled_1.5"], finish_reason="stop",
                           stop_word_mass=0.2201)],
        divergence=[pb.Divergence(variant="no_super_weights", first_differing_token=0, top1_agreement=0.03125,
                                  mean_kl_topk=7.654321),
                    pb.Divergence(variant="scaled_1.5", first_differing_token=-1, top1_agreement=1.0,
                                  mean_kl_topk=0.0012)])
    out = render(print_compare, response, "The capital of France is")
    assert_fits(out)
    lines = [line.rstrip() for line in out.splitlines()]
    assert "prompt: 'The capital of France is'" in lines
    assert lines[1].split() == ["variant", "finish", "stop-word", "mass", "first", "diff", "top-1", "agree", "KL",
                                "top-k"]
    assert lines[3].split() == ["base", "length", "0.213", "-", "-", "-"]
    assert lines[4].split() == ["no_super_weights", "length", "0.812", "0", "0.03", "7.654"]
    assert lines[5].split() == ["scaled_1.5", "stop", "0.220", "none", "1.00", "0.001"]  # none: the same tokens
    for variant, text in texts.items():  # below the table, whole, line by line
        start = lines.index(f"{variant}:")
        assert lines[start + 1: start + 1 + len(text.splitlines())] == [f"  {t}".rstrip() for t in text.splitlines()]
