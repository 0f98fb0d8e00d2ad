"""`superweights eval`: every scheme with and without protection and clipping, on one evaluation text.

Weights are quantized in place from a pristine copy for each configuration (simulated: quantize, dequantize);
activations through forward pre-hooks. Protection holds the report's super weights out of every weight scale and
the super activation's channels out of every activation scale, and restores both exactly.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .evaluation import Quality, evaluate, load_eval_text, stop_word_ids
from .models import Checkpoint, load_model
from .quantize import (
    Clip,
    held_out_channels,
    protected_entries,
    quantize_activations,
    quantize_model,
    quantized_linears,
)
from .report import SuperWeightReport
from .schemes import Scheme, fit_to_model


@dataclass(frozen=True)
class SchemeResult:
    scheme: str
    protect: bool
    clip: str
    perplexity: float
    next_token_accuracy: float
    stop_word_mass: float
    seconds: float

    @property
    def label(self) -> str:
        return f"{self.scheme} {'protected' if self.protect else 'plain'}{'' if self.clip == 'none' else ' +clip'}"


def _row(scheme: str, protect: bool, clip: str, q: Quality, seconds: float) -> SchemeResult:
    return SchemeResult(scheme, protect, clip, q.perplexity, q.next_token_accuracy, q.stop_word_mass, seconds)


def evaluate_schemes(checkpoint: Checkpoint, report: SuperWeightReport, schemes: list[Scheme],
                     clips: tuple[tuple[Clip, float], ...] = (("none", 0.0), ("search", 0.0)),
                     tokens: int = 4096, window: int = 512, progress: bool = True, device: str = "auto",
                     dtype: str = "auto") -> list[SchemeResult]:
    """The original model, then each scheme x {plain, protected} x clips; one row each (device, dtype: where the
    model is loaded, models.offline_placement)."""
    from tqdm import tqdm

    model, tokenizer = load_model(checkpoint, device=device, dtype=dtype)
    text = load_eval_text(tokenizer)
    ids = text.ids[:tokens]
    stop_ids = stop_word_ids(lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    entries, held = protected_entries(report), held_out_channels(report)
    start = time.perf_counter()
    rows = [_row("original", False, "none", evaluate(model, ids, window, stop_ids=stop_ids, bos_id=text.bos_id),
                 time.perf_counter() - start)]
    widths = [m.in_features for m in quantized_linears(model).values()]
    schemes = [fit_to_model(s, widths) for s in schemes]
    configs = [(s, p, c) for s in schemes for c in clips for p in (False, True)]
    for scheme, protect, (clip, clip_value) in tqdm(configs, desc="eval", unit="config", disable=not progress):
        variant = scheme.variant(protect=protect, clip=clip, clip_value=clip_value)
        start = time.perf_counter()
        model.load_state_dict(pristine)
        modules = quantize_model(model, variant.weights, entries)
        hooks = (quantize_activations(model, variant.activations, modules, held) if variant.activations
                 else contextlib.nullcontext())
        with hooks:
            quality = evaluate(model, ids, window, stop_ids=stop_ids, bos_id=text.bos_id)
        rows.append(_row(scheme.name, protect, clip, quality, time.perf_counter() - start))
    model.load_state_dict(pristine)
    return rows


def markdown_table(rows: list[SchemeResult], schemes: dict[str, Scheme]) -> str:
    """One line per scheme and configuration, perplexity relative to the original."""
    base = rows[0].perplexity
    lines = ["| scheme | what | protection | clipping | perplexity | vs original | next-token acc. | stop-word mass |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        what = schemes[r.scheme].summary if r.scheme in schemes else "float32, as converted from the GGUF"
        lines.append(f"| {r.scheme} | {what} | {'yes' if r.protect else 'no'} | {r.clip} | {r.perplexity:,.2f} | "
                     f"{r.perplexity / base:,.3f}x | {r.next_token_accuracy:.4f} | {r.stop_word_mass:.4f} |")
    return "\n".join(lines)


def plot_schemes(rows: list[SchemeResult], path: Path, title: str) -> Path:
    """Grouped bars: perplexity per scheme for each protection/clipping configuration (log scale)."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    base = rows[0]
    names = list(dict.fromkeys(r.scheme for r in rows[1:]))
    configs = list(dict.fromkeys((r.protect, r.clip) for r in rows[1:]))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(names)), 4.8))
    width = 0.8 / max(len(configs), 1)
    for i, (protect, clip) in enumerate(configs):
        values = [next((r.perplexity for r in rows[1:] if (r.scheme, r.protect, r.clip) == (n, protect, clip)),
                       float("nan")) for n in names]
        label = f"{'protected' if protect else 'plain'}{'' if clip == 'none' else f', clip={clip}'}"
        ax.bar([k + (i - (len(configs) - 1) / 2) * width for k in range(len(names))], values, width, label=label)
    ax.axhline(base.perplexity, color="black", linestyle="--", linewidth=1, label=f"original {base.perplexity:.2f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_results(rows: list[SchemeResult], schemes: dict[str, Scheme], out_dir: Path, meta: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md", "plot": out_dir / "eval.png"}
    paths["json"].write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2))
    paths["markdown"].write_text(markdown_table(rows, schemes) + "\n")
    plot_schemes(rows, paths["plot"], f"{meta.get('model', '')}: perplexity by scheme ({meta.get('tokens')} tokens)")
    return paths
