"""`superweights compare --plot FILE.png`: the arms' per-token probabilities of their chosen tokens, the first
divergence marked; the real CLI against a test server, and the plot on its own."""

from __future__ import annotations

import numpy as np
import pytest

from superweights.compression.plots import READABLE_TOKENS, ArmTrace, plot_compare
from tests.conftest import TOKEN, run_cli

PROMPT = "The capital of France is"
ARM_COLORS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E)}  # matplotlib's first two: base, no_super_weights


def read_png(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3]  # [H, W, 3] floats in [0, 1]


def pixels_of(image: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 0.06) -> int:
    return int((np.abs(image - np.array(rgb) / 255).max(axis=-1) < tolerance).sum())


def assert_drawn(image: np.ndarray, min_width: int = 900, min_height: int = 500) -> None:
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, image.shape
    assert (image.min(axis=-1) < 0.9).mean() > 0.01, "the plot is blank"
    for name, rgb in ARM_COLORS.items():
        assert pixels_of(image, rgb) > 200, f"no line in the arm colour {name}"


def test_plot_compare_on_its_own(tmp_path):
    base = ArmTrace("base", (" Paris", ".", "\n"), (0.6, 0.5, 0.9))
    removed = ArmTrace("no_super_weights", (" oun", "oun", "soun"), (0.1, 0.3, 0.2), first_difference=0)
    assert_drawn(read_png(plot_compare([base, removed], tmp_path / "two.png", title=PROMPT)))
    many = READABLE_TOKENS + 20  # past the readable limit: no token rows, still one line per arm
    same = [ArmTrace(v, ("a",) * many, tuple(np.linspace(low, 0.9, many)))
            for v, low in (("base", 0.2), ("no_super_weights", 0.5))]
    assert_drawn(read_png(plot_compare(same, tmp_path / "many.png")), min_width=1200, min_height=400)


@pytest.mark.slow
def test_compare_plot_from_the_cli(servers, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width: no variant name wrapped across lines
    target = ("--target", servers["auth"].target, "--token", TOKEN)
    png = tmp_path / "compare.png"
    done = run_cli("compare", PROMPT, "--max-tokens", "12", "--plot", str(png), *target)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"plot written to {png}" in done.stdout
    assert "no_super_weights" in done.stdout and "Paris" in done.stdout  # the table is still printed
    assert_drawn(read_png(png))

    plain = run_cli("compare", PROMPT, "--max-tokens", "12", *target)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "no_super_weights" in plain.stdout and "Paris" in plain.stdout and "plot written" not in plain.stdout
    for column in ("variant", "text", "first diff"):
        assert column in plain.stdout
