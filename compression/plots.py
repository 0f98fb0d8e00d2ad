"""Plots a person would rather look at than a table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import SuperWeightReport


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
            ax.axvspan(a.layer - 0.5, a.last_layer + 0.5, color="orange", alpha=0.12)
        ax.grid(alpha=0.3)
    names = ", ".join(f"L{w.layer}[{w.row},{w.col}]" for w in report.super_weights) or "none found"
    channels = ", ".join(f"channel {a.channel} from layer {a.layer}" for a in report.super_activations) or "none"
    fig.suptitle(f"{report.model.name}: super weights {names}; super "
                 f"activations (shaded) {channels}\nprompt: {report.prompt!r}", fontsize=9)
    return save_figure(fig, path)


@dataclass(frozen=True)
class ArmTrace:
    """One arm of a compare as plotted: the tokens it generated and the probability it gave each one."""

    variant: str
    tokens: tuple[str, ...]
    probabilities: tuple[float, ...]  # exp(logprob) of each chosen token
    first_difference: int | None = None  # first position where it differs from the first arm; None: equal, or first


READABLE_TOKENS = 48  # more positions than this and the token rows become unreadable: the plot leaves them out


def _token_label(token: str, width: int = 10) -> str:
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    shown = shown if shown.strip() else repr(token)
    return shown if len(shown) <= width else shown[:width - 1] + "\u2026"


def plot_compare(arms: list[ArmTrace], path: Path, title: str = "") -> Path:
    """Each arm's probability of the token it chose, one line per arm over the generated positions, the first
    divergence from the first arm marked; below, where readable, the arms' tokens side by side (a token that
    differs from the first arm's at that position in the arm's colour)."""
    plt = pyplot()
    positions = max((len(a.tokens) for a in arms), default=0)
    readable = 0 < positions <= READABLE_TOKENS
    width = max(8.0, 0.3 * positions + 2.5) if readable else 14.0
    if readable:
        fig, (ax, grid) = plt.subplots(2, 1, sharex=True, figsize=(width, 3.8 + 0.8 * len(arms)),
                                       gridspec_kw={"height_ratios": [3.8, 0.8 * len(arms)]})
    else:
        fig, ax = plt.subplots(figsize=(width, 4.2))
    colors = [f"C{i}" for i in range(len(arms))]
    reference = arms[0].tokens if arms else ()
    for arm, color in zip(arms, colors):
        diverges = arm.first_difference is not None
        ax.plot(range(len(arm.probabilities)), arm.probabilities, marker="o", markersize=3.5 if readable else 2,
                color=color, label=f"{arm.variant}: first divergence at token {arm.first_difference}" if diverges
                else arm.variant)
        if diverges:
            ax.axvline(arm.first_difference, color=color, linestyle="--", alpha=0.7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("p(chosen token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(arms), 2), fontsize=8, frameon=False)
    if not any(a.first_difference is not None for a in arms[1:]):
        title += "\nevery arm generated the same tokens"
    fig.suptitle(title, fontsize=9)
    bottom = ax
    if readable:
        rotation = 0 if positions <= 16 else 90
        for row, (arm, color) in enumerate(zip(arms, colors)):
            for i, token in enumerate(arm.tokens):
                differs = i >= len(reference) or token != reference[i]
                grid.text(i, row, _token_label(token), rotation=rotation, ha="center", va="center", fontsize=7,
                          color=color if differs else "0.3", fontweight="bold" if differs else "normal")
            if arm.first_difference is not None:  # the column where this arm leaves the first arm's tokens
                grid.axvspan(arm.first_difference - 0.5, arm.first_difference + 0.5, color=color, alpha=0.15)
        grid.set_ylim(len(arms) - 0.5, -0.5)
        grid.set_yticks(range(len(arms)), [a.variant for a in arms], fontsize=8)
        bottom = grid
    else:
        ax.text(0.99, 0.02, f"{positions} tokens: too many to label", transform=ax.transAxes, ha="right",
                fontsize=8, color="0.4")
    bottom.set_xlabel("generated token")
    bottom.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bottom.set_xlim(-0.7, max(positions, 1) - 0.3)
    return save_figure(fig, path)
