"""Bad input: a one-line error, a non-zero exit, no traceback."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import run_cli


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("superweights: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("-q", "detect", str(tmp_path / "nope")), "does not exist")


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    assert_one_line_error(run_cli("-q", "detect", str(path)), "not a model")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    assert_one_line_error(run_cli("-q", "detect", str(tmp_path)), "no config.json")


def test_checkpoint_without_down_projection(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_inner=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    model.save_pretrained(tmp_path / "ckpt")
    # a tokenizer is not needed: the structural check fails first
    assert_one_line_error(run_cli("-q", "detect", str(tmp_path / "ckpt")), "no MLP down-projection")


def test_bad_setting():
    assert_one_line_error(run_cli("-q", "detect", "--min-effect", "0.5"), "min_effect")


def test_a_gpu_asked_for_on_a_machine_without_one():
    import torch

    if torch.cuda.is_available():
        return  # this check is for machines without a GPU (CI here)
    assert_one_line_error(run_cli("-q", "detect", "--device", "cuda"), "sees no GPU", "--device cpu")
