"""The BOS convention: evaluation windows start with BOS where the tokenizer adds one (lm-eval's rolling windows),
stop-word ids come from text tokenized without special tokens, and a converted GGUF keeps its BOS behaviour."""

import json

import torch

from superweights.compression.detect import DetectionSettings, find_super_weights
from superweights.compression.evaluation import (
    EvalText,
    bos_token_id,
    eval_windows,
    evaluate,
    load_eval_text,
    stop_word_ids,
)
from tests.tiny_models import ByteTokenizer, bos_tokenizer, planted_llama, sampled_text, write_tiny_gguf


def test_bos_is_taken_from_what_the_tokenizer_does():
    assert bos_token_id(bos_tokenizer(add_bos=True)) == 0
    assert bos_token_id(bos_tokenizer(add_bos=False)) is None  # names a BOS token (like SmolLM2) but does not add it
    assert bos_token_id(ByteTokenizer()) is None


def test_load_eval_text_records_the_bos_and_keeps_it_out_of_the_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the whale , the sea . " * 4)
    text = load_eval_text(bos_tokenizer(), path)
    assert text.bos_id == 0 and 0 not in text.ids.tolist() and text.ids.numel() == 24
    assert load_eval_text(bos_tokenizer(add_bos=False), path).bos_id is None


def test_windows_start_with_bos_and_score_every_text_token():
    ids = torch.arange(10, 20)
    with_bos = eval_windows(ids, 4, bos_id=1)
    assert [w.tolist() for w in with_bos] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert [w.tolist() for w in eval_windows(ids, 4)] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    model = planted_llama()
    text = sampled_text(model, 200)
    assert evaluate(model, text.ids, window=64, bos_id=1).tokens == 200  # every text token, none as context only
    assert evaluate(model, text.ids, window=64).tokens == 200 - 4  # each window's first token is context only


def test_stop_words_from_a_tokenizer_that_adds_bos():
    tokenizer = bos_tokenizer()
    ids = stop_word_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    assert {tokenizer.convert_tokens_to_ids(w) for w in ("the", "The", ".", ",", "and", "of")} <= ids
    assert 0 not in ids
    # with special tokens every word is [BOS, word]: nothing but the BOS itself would come out
    assert stop_word_ids(lambda s: tokenizer(s)["input_ids"]) <= {0}


def test_the_report_says_which_convention_its_baseline_used():
    model = planted_llama()
    sampled = sampled_text(model, 512)
    text = EvalText(name="samples", sha256="", ids=sampled.ids, bos_id=1)
    settings = DetectionSettings(eval_tokens=384, window=128)
    report = find_super_weights(model, ByteTokenizer(), text, settings=settings, progress=False)
    e = report.evaluation
    assert e.bos is True and e.bos_token_id == 1 and e.tokens == 384 and e.window == 128
    # what the server's self-check reproduces: this many text tokens, these windows, this BOS
    again = evaluate(model, text.ids[: e.tokens], e.window, bos_id=e.bos_token_id).perplexity
    assert abs(again / e.baseline_perplexity - 1) < 1e-4
    plain = find_super_weights(model, ByteTokenizer(), sampled, settings=settings, progress=False)
    assert plain.evaluation.bos is False and plain.evaluation.bos_token_id is None


def test_a_converted_gguf_keeps_its_bos_behaviour(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from superweights.compression.models import resolve_checkpoint

    monkeypatch.setenv("SUPERWEIGHTS_CACHE", str(tmp_path / "cache"))
    for add_bos in (True, False):
        gguf = tmp_path / f"tiny-{add_bos}.gguf"
        write_tiny_gguf(gguf, add_bos=add_bos)
        checkpoint = resolve_checkpoint(str(gguf))
        config = json.loads((checkpoint.path / "tokenizer_config.json").read_text())
        assert config["add_bos_token"] is add_bos
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        assert (tokenizer("a")["input_ids"][0] == 0) is add_bos
        assert bos_token_id(tokenizer) == (0 if add_bos else None)
