"""Plots a person would rather look at than a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .detect import SuperWeightReport


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_layer_extremes(report: SuperWeightReport, path: Path) -> Path:
    """Per-layer max |input| and max |output| of the MLP down-projections (the paper's Figure 3)."""
    plt = pyplot()
    layers = [s.layer for s in report.layer_stats]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    series = (("max |input|", [s.max_abs_input for s in report.layer_stats]),
              ("max |output|", [s.max_abs_output for s in report.layer_stats]))
    for ax, (title, values) in zip(axes, series):
        ax.plot(layers, values, marker="o", markersize=3)
        ax.set_yscale("log")
        ax.set_title(f"down_proj {title}")
        ax.set_xlabel("layer")
        for w in report.super_weights:
            ax.axvline(w.layer, color="crimson", alpha=0.4, linestyle="--")
        for a in report.super_activations:  # the layers whose output carries a super activation
            ax.axvspan(a.layer - 0.5, (a.last_layer if a.last_layer is not None else a.layer) + 0.5,
                       color="orange", alpha=0.12)
        ax.grid(alpha=0.3)
    names = ", ".join(f"L{w.layer}[{w.row},{w.col}]" for w in report.super_weights) or "none found"
    channels = ", ".join(f"channel {a.channel} from layer {a.layer}" for a in report.super_activations) or "none"
    fig.suptitle(f"{report.model.get('name', report.model['architecture'])}: super weights {names}; super "
                 f"activations (shaded) {channels}\nprompt: {report.prompt!r}", fontsize=9)
    return save_figure(fig, path)
