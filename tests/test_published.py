"""The directory of published super weights: the shipped data, coordinate parsing, matching and agreement."""

import json

import pytest

from superweights.compression.errors import UserError
from superweights.compression.published import (
    Coordinate,
    CoordinateOutOfRangeError,
    CoordinateSpecError,
    MalformedDirectoryError,
    agreement,
    check_fits,
    load_directory,
    match,
    parse_coordinates,
)

ENTRIES = load_directory()
BY_ID = {e.id: e for e in ENTRIES}

LLAMA_3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "vocab_size": 128256}
LLAMA_7B_SHAPE = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "vocab_size": 32000}
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "vocab_size": 49152}


def coords(*triples):
    return {Coordinate(*t) for t in triples}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_every_entry_lies_inside_its_architecture_and_cites_a_source(entry):
    a = entry.architecture
    for c in entry.coordinates + tuple(d.alternative for d in entry.disputes):
        assert 0 <= c.layer < a.num_hidden_layers
        assert 0 <= c.row < a.hidden_size
        assert 0 <= c.col < a.intermediate_size
    assert entry.names and all(n.strip() for n in entry.names)
    assert entry.source.citation.strip() and entry.source.where.strip() and entry.source.url.startswith("https://")
    assert len(set(entry.coordinates)) == len(entry.coordinates)


def test_entries_match_the_published_tables():
    expected = {
        "llama-7b": [(2, 3968, 7003)],
        "llama-13b": [(2, 2231, 2278), (2, 2231, 6939)],
        "llama-30b": [(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)],
        "llama-2-7b": [(1, 2533, 7890)],
        "llama-2-13b": [(3, 4743, 7678)],
        "mistral-7b-v0.1": [(1, 2070, 7310)],
        "olmo-1b-0724": [(1, 1764, 1710), (1, 1764, 8041)],
        "olmo-7b-0724": [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)],
        "phi-3-mini-4k-instruct": [(2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723), (4, 1113, 2723),
                                   (4, 1693, 2723)],
        "meta-llama-3-8b": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)],
        "llama-3.2-1b": [(1, 400, 1417), (1, 698, 1417), (1, 2029, 1417), (1, 1159, 1417)],
    }
    assert {e.id: set(e.coordinates) for e in ENTRIES} == {k: coords(*v) for k, v in expected.items()}
    assert BY_ID["meta-llama-3-8b"].source.url == "https://github.com/mengxiayu/LLMSuperWeight"
    assert "2507.23279" in BY_ID["llama-3.2-1b"].source.citation and BY_ID["llama-3.2-1b"].source.where == "Table 8"
    assert all(BY_ID[k].source.where == "Table 2" for k in expected if k not in ("meta-llama-3-8b", "llama-3.2-1b"))


def test_olmo_1b_records_the_code_disagreeing_with_the_paper():
    (dispute,) = BY_ID["olmo-1b-0724"].disputes
    assert dispute.published == Coordinate(1, 1764, 8041)
    assert dispute.alternative == Coordinate(2, 1764, 8041)
    assert "LLMSuperWeight" in dispute.source.url and dispute.note


def test_parse_coordinates_reads_the_cli_form():
    assert parse_coordinates("1:788:2427,1:1384:2427") == [Coordinate(1, 788, 2427), Coordinate(1, 1384, 2427)]
    assert parse_coordinates(" 2:3968:7003 ") == [Coordinate(2, 3968, 7003)]
    assert parse_coordinates("1: 2 :3, 4:5:6") == [Coordinate(1, 2, 3), Coordinate(4, 5, 6)]


@pytest.mark.parametrize("spec, says", [
    ("", "no super weights given"),
    ("1:2", "'1:2'"),
    ("1:2:3:4", "4 numbers"),
    ("1:2:x", "COL 'x' is not a whole number"),
    ("1.5:2:3", "LAYER '1.5'"),
    ("1:-2:3", "ROW -2 is negative"),
    ("1:2:3,", "empty (a stray comma?)"),
    ("1:2:3,,4:5:6", "empty"),
    ("1:2:3,01:2:3", "given twice"),
])
def test_parse_coordinates_rejects_bad_pieces_with_an_actionable_message(spec, says):
    with pytest.raises(CoordinateSpecError) as caught:
        parse_coordinates(spec)
    assert says in str(caught.value)
    assert isinstance(caught.value, UserError)
    if "twice" not in says:
        assert "LAYER:ROW:COL" in str(caught.value)


def test_check_fits_names_what_is_outside():
    check_fits(parse_coordinates("31:4095:11007"), num_layers=32, hidden=4096, intermediate=11008)
    with pytest.raises(CoordinateOutOfRangeError) as caught:
        check_fits(parse_coordinates("1:100:200,10:5633:14386"), num_layers=30, hidden=576, intermediate=1536)
    message = str(caught.value)
    assert "layer 10 [5633, 14386] (row 5633 not in 0-575, col 14386 not in 0-1535)" in message
    assert "layer 1 [100, 200]" not in message
    assert "30 layers" in message and "[576, 1536]" in message


def test_match_finds_llama_3_8b_by_name_and_sizes():
    for name in ("meta-llama/Meta-Llama-3-8B", "Meta-Llama-3-8B-Instruct", "/models/meta-llama-3-8b/", None):
        assert match(LLAMA_3_8B, name).id == "meta-llama-3-8b"
    assert match({**LLAMA_3_8B, "vocab_size": 32000}, "meta-llama/Meta-Llama-3-8B") is None  # sizes decide first


def test_match_on_llama_7b_sizes_needs_a_name():
    assert match(LLAMA_7B_SHAPE, None) is None  # Llama-7B and Llama-2-7B: equal configs, other super weights
    assert match(LLAMA_7B_SHAPE, "someone/my-llama") is None
    assert match(LLAMA_7B_SHAPE, "huggyllama/llama-7b").id == "llama-7b"
    assert match(LLAMA_7B_SHAPE, "meta-llama/Llama-2-7b-chat-hf").id == "llama-2-7b"


def test_match_tells_models_of_equal_sizes_by_model_type():
    olmo = {"model_type": "olmo", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "vocab_size": 50304}
    assert match(olmo).id == "olmo-1b-0724"
    assert match({**olmo, "model_type": "llama", "vocab_size": 128256}).id == "llama-3.2-1b"


def test_match_returns_none_for_the_default_model():
    assert match(SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert match(SMOLLM2_135M, None) is None


def test_agreement_and_describe():
    entry = BY_ID["meta-llama-3-8b"]
    result = agreement(entry, [Coordinate(1, 788, 2427), Coordinate(1, 4062, 2427), Coordinate(3, 7, 9)])
    assert result.published == ((Coordinate(1, 788, 2427), True), (Coordinate(1, 1384, 2427), False),
                                (Coordinate(1, 4062, 2427), True))
    assert result.unpublished == (Coordinate(3, 7, 9),)
    assert not result.exact
    assert result.describe().splitlines() == [
        "layer 1 [788, 2427]: published, detected",
        "layer 1 [1384, 2427]: published, not detected",
        "layer 1 [4062, 2427]: published, detected",
        "layer 3 [7, 9]: detected, not published",
    ]
    assert agreement(entry, parse_coordinates("1:4062:2427,1:788:2427,1:1384:2427")).exact


def test_describe_points_at_a_disputed_coordinate():
    entry = BY_ID["olmo-1b-0724"]
    lines = agreement(entry, parse_coordinates("1:1764:1710,2:1764:8041")).describe().splitlines()
    assert lines[0] == "layer 1 [1764, 1710]: published, detected"
    assert lines[1].startswith("layer 1 [1764, 8041]: published, not detected (disputed: ")
    assert lines[1].endswith("gives layer 2 [1764, 8041])")
    assert lines[2].startswith("layer 2 [1764, 8041]: detected, not published (")
    assert lines[2].endswith("in place of layer 1 [1764, 8041])")


def write_directory(tmp_path, entry):
    path = tmp_path / "directory.json"
    path.write_text(json.dumps({"entries": [entry]}))
    return path


GOOD = {"id": "tiny", "names": ["org/tiny"],
        "architecture": {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2},
        "super_weights": [{"layer": 1, "row": 7, "col": 15}],
        "source": {"citation": "A. Author 2025", "where": "Table 1", "url": "https://example.org"}}


def test_load_directory_reads_a_file_of_the_same_format(tmp_path):
    (entry,) = load_directory(write_directory(tmp_path, GOOD))
    assert entry.coordinates == (Coordinate(1, 7, 15),) and entry.architecture.vocab_size is None


@pytest.mark.parametrize("change, says", [
    ({"super_weights": [{"layer": 2, "row": 7, "col": 15}]}, "layer 2 not in 0-1"),
    ({"super_weights": [{"layer": 1, "row": -1, "col": 15}]}, "'row' must be a whole number >= 0"),
    ({"names": []}, "'names' must be a non-empty list"),
    ({"source": {"citation": "", "where": "Table 1", "url": "https://example.org"}}, "'citation'"),
    ({"architecture": {**GOOD["architecture"], "vocab": 10}}, "unknown architecture field(s) ['vocab']"),
])
def test_load_directory_names_the_malformed_entry(tmp_path, change, says):
    with pytest.raises(MalformedDirectoryError) as caught:
        load_directory(write_directory(tmp_path, {**GOOD, **change}))
    assert "entry 'tiny'" in str(caught.value) and says in str(caught.value)
