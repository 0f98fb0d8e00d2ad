"""Declared super weights (--super-weights): read from the checkpoint without detection, refused when they do not
fit the model."""

import pytest
import torch
from safetensors.torch import load_file

from superweights.compression.declared import declared_report
from superweights.compression.models import resolve_checkpoint
from superweights.compression.published import Coordinate, CoordinateOutOfRangeError
from tests.conftest import run_cli

SMOLLM2 = [Coordinate(11, 507, 1229), Coordinate(11, 507, 1487)]  # what detection finds on the default model


def test_declared_values_are_the_checkpoints():
    checkpoint = resolve_checkpoint(None)
    report = declared_report(checkpoint, SMOLLM2)
    weights = load_file(checkpoint.path / "model.safetensors")
    for w in report.super_weights:
        assert w.module == f"model.layers.{w.layer}.mlp.down_proj"
        torch.testing.assert_close(w.value, float(weights[w.parameter][w.row, w.col]), rtol=0, atol=0)
    assert report.model.declared and report.model.hidden_size == 576 and report.evaluation.baseline_perplexity is None


def test_declared_coordinate_outside_the_model_is_refused():
    with pytest.raises(CoordinateOutOfRangeError, match="row 5633 not in 0-575"):
        declared_report(resolve_checkpoint(None), [Coordinate(3, 5633, 12817)])


def test_malformed_declaration_is_a_one_line_error():
    done = run_cli("-q", "serve", "--super-weights", "1:788", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "expected LAYER:ROW:COL" in done.stderr
