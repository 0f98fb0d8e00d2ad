"""Data-free super-weight detection (Yu et al., "The Super Weight in Large Language Models"), with verification.

1. Scan: one prompt, hooks on every MLP down-projection. A layer whose max |output| spikes far above its median
   |output| (a massive activation) gives the row (the spiking output channel); the column is the input channel that
   contributes most to that output, `argmax_c |x[t, c] * W[row, c]|`, which is the input spike. Zero that weight,
   run again, repeat until no layer spikes: those are the candidates.
2. Verification: each candidate's effect on the perplexity of an evaluation text, alone and on top of the
   candidates confirmed before it. Only candidates whose removal costs real perplexity are super weights; the rest
   are reported as rejected. Every removal is measured first on a screen, the first `screen_tokens` tokens of the
   text, several removals per batched forward (compression.ablation); a verdict the screen cannot settle (closer to
   its threshold than four standard errors, or than a quarter of it) is measured again on all `eval_tokens`.
   Two controls: as many of the largest other down-projection weights as there are super weights, and the paper's
   form, the `control_weights` (50) largest.
3. Super activations: each residual-stream channel the scan points at that carries a massive activation on the
   prompt, with the layers it persists through and the candidates in its row that feed it, each with what
   removing it does to the activation and to perplexity. A super activation is a finding of its own: one that no
   single weight carries (removing its feeders costs no perplexity) is reported all the same.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .ablation import AblationScorer, decoder_blocks, forward_hooks, removals
from .architectures import DownProjection, find_down_projections, hidden_size
from .errors import UserError
from .evaluation import EvalText, eval_windows

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
REPORT_SCHEMA = "superweights.report/v1"
# A screen verdict stands when its margin exceeds this many standard errors of the per-token log-ratio...
SCREEN_STANDARD_ERRORS = 4.0
# ...and this fraction of log(min_effect): the screen is one passage, so a near call is remeasured on all tokens.
SCREEN_MARGIN = 0.25
PERSIST = 0.25  # a super activation persists through the layers where it keeps this fraction of its peak


@dataclass(frozen=True)
class LayerStats:
    """Per down-projection activation extremes on the detection prompt."""

    layer: int
    module: str  # module name, e.g. "model.layers.3.mlp.down_proj"
    max_abs_input: float
    input_channel: int
    max_abs_output: float
    output_channel: int
    token_position: int
    median_abs_output: float

    @property
    def spike(self) -> float:
        """How far the largest output stands above the layer's typical output."""
        return self.max_abs_output / max(self.median_abs_output, 1e-12)


@dataclass
class SuperWeight:
    layer: int
    module: str  # module name, e.g. "model.layers.3.mlp.down_proj"
    row: int  # output channel = residual-stream channel of the super activation
    col: int  # input channel of the down-projection
    value: float
    input_magnitude: float  # |x[t, col]| on the prompt when it was found
    output_magnitude: float  # |y[t, row]| on the prompt when it was found
    perplexity_removed: float | None = None  # eval perplexity with only this weight zeroed
    perplexity_ratio: float | None = None  # perplexity_removed / baseline, on the same tokens
    conditional_ratio: float | None = None  # ppl(this + super weights confirmed before it removed) / ppl(those removed)
    tokens: int | None = None  # scored tokens behind the three numbers above: the screen's, or all eval tokens

    @property
    def parameter(self) -> str:
        """Its parameter's name, e.g. "model.layers.3.mlp.down_proj.weight"."""
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Feeder:
    """A candidate in a super activation's row, at or before the layer where the activation appears."""

    layer: int
    module: str
    row: int
    col: int
    value: float
    confirmed: bool  # a confirmed super weight
    perplexity_ratio: float | None  # eval perplexity x with only this weight zeroed
    value_removed: float  # the activation (same layer, token, channel) with only this weight zeroed


@dataclass(frozen=True)
class SuperActivation:
    """A massive activation in the residual stream on the detection prompt."""

    layer: int  # first block whose output carries it
    channel: int
    value: float  # at that block's output
    token_position: int
    token: str
    last_layer: int | None = None  # last block output it persists through (None: a report from before)
    feeders: list[Feeder] = field(default_factory=list)
    value_removed: float | None = None  # the activation with every feeder zeroed together
    perplexity_ratio_removed: float | None = None  # eval perplexity x with every feeder zeroed (screen tokens)
    carried_by_super_weight: bool = False  # a feeder is a confirmed super weight; else no single weight carries it

    @classmethod
    def from_dict(cls, d: dict) -> SuperActivation:
        return cls(**dict(d, feeders=[Feeder(**f) for f in d.get("feeders", [])]))


def _activations(entries: list[dict]) -> list[SuperActivation]:
    """Reports from before listed one entry per layer an activation persisted through: merged here, per channel."""
    if all("last_layer" in a for a in entries):
        return [SuperActivation.from_dict(a) for a in entries]
    merged: dict[int, dict] = {}
    for a in sorted(entries, key=lambda a: a["layer"]):
        first = merged.setdefault(a["channel"], dict(a))
        first["last_layer"] = a["layer"]
    return [SuperActivation.from_dict(a) for a in merged.values()]


@dataclass(frozen=True)
class ModelFacts:
    """What a report says about its model (report.model, typed; the JSON keeps the dict)."""

    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int | None
    sha256: str
    declared: bool  # super weights declared (--super-weights), not detected
    protected: bool  # False: an artifact made with --no-protect

    @classmethod
    def of(cls, m: dict) -> ModelFacts:
        return cls(name=m.get("name") or m.get("architecture", ""), architecture=m.get("architecture", ""),
                   hidden_size=m["hidden_size"], intermediate_size=m.get("intermediate_size"),
                   sha256=m.get("sha256", ""), declared=bool(m.get("declared")), protected=m.get("protected", True))


@dataclass(frozen=True)
class EvalFacts:
    """What a report measured on its evaluation text (report.eval, typed); perplexity ratios are over the intact
    model's on the same tokens."""

    text: str
    tokens: int
    window: int
    bos: bool  # every window starts with BOS
    baseline_perplexity: float | None
    removed_ratio: float | None  # every super weight removed
    control_ratio: float | None  # as many of the largest other down-projection weights removed
    dtype: str  # the offline dtype the numbers were computed in

    @classmethod
    def of(cls, e: dict) -> EvalFacts:
        base = e.get("baseline_perplexity")

        def ratio(name: str) -> float | None:  # reports from before stored only perplexities, on the same tokens
            if f"{name}_ratio" in e:
                return e[f"{name}_ratio"]
            return e[f"{name}_perplexity"] / base if e.get(f"{name}_perplexity") and base else None

        return cls(text=e.get("text", ""), tokens=e.get("tokens", 0), window=e.get("window", 512),
                   bos=bool(e.get("bos")), baseline_perplexity=base, removed_ratio=ratio("removed"),
                   control_ratio=ratio("control"), dtype=e.get("dtype", "float32"))


@dataclass
class SuperWeightReport:
    model: dict
    prompt: str
    created_at: str
    eval: dict
    super_weights: list[SuperWeight]
    rejected_candidates: list[SuperWeight]
    super_activations: list[SuperActivation]
    layer_stats: list[LayerStats]
    settings: dict
    schema: str = REPORT_SCHEMA
    published: dict | None = None  # agreement with the directory of published super weights (published_agreement)
    timings: dict = field(default_factory=dict)  # seconds per detection phase

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.of(self.model)

    @property
    def evaluation(self) -> EvalFacts:
        return EvalFacts.of(self.eval)

    @property
    def min_effect(self) -> float:
        return self.settings.get("min_effect", DetectionSettings.min_effect)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> SuperWeightReport:
        if d.get("schema") != REPORT_SCHEMA:
            raise ValueError(f"not a {REPORT_SCHEMA} report (schema={d.get('schema')!r})")
        return cls(
            model=d["model"], prompt=d["prompt"], created_at=d["created_at"], eval=d["eval"],
            super_weights=[SuperWeight(**_module_named(w)) for w in d["super_weights"]],
            rejected_candidates=[SuperWeight(**_module_named(w)) for w in d["rejected_candidates"]],
            super_activations=_activations(d["super_activations"]),
            layer_stats=[LayerStats(**_module_named(s)) for s in d["layer_stats"]], settings=d["settings"],
            published=d.get("published"), timings=d.get("timings", {}))

    @classmethod
    def load(cls, path: Path) -> SuperWeightReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _module_named(entry: dict) -> dict:
    """Reports cached before module names were used held parameter names ("...down_proj.weight")."""
    return dict(entry, module=entry["module"].removesuffix(".weight"))


@dataclass(frozen=True)
class DetectionSettings:
    """Knobs of detection and verification; the defaults suit models from 100M to 70B parameters."""

    spike_ratio: float = 100.0  # a layer spikes when its max |output| is this many times its median |output|
    max_candidates: int = 8
    # stop once the largest spike left is below this fraction of the first one: a super weight's partner is of the
    # same order (SmolLM2's second: 27% of the first), the noise left after removal is not (7% and below there)
    min_spike_fraction: float = 0.1
    min_effect: float = 2.0  # confirmed when removal multiplies eval perplexity by at least this much
    eval_tokens: int = 1024  # tokens of the evaluation text: the baseline, and removals the screen cannot settle
    window: int = 512
    screen_tokens: int = 128  # every removal is measured first on this many tokens (the start of the first window)
    control_weights: int = 50  # the paper's control: this many of the largest other down-projection weights removed

    def __post_init__(self) -> None:
        if self.spike_ratio <= 1 or self.min_effect <= 1:
            raise UserError("spike_ratio and min_effect must be > 1")
        if not 0 <= self.min_spike_fraction < 1:
            raise UserError("min_spike_fraction must be in [0, 1)")
        if self.max_candidates < 1 or self.eval_tokens < 16 or self.window < 2:
            raise UserError("max_candidates >= 1, eval_tokens >= 16 and window >= 2 are required")
        if self.screen_tokens < 16 or self.control_weights < 1:
            raise UserError("screen_tokens >= 16 and control_weights >= 1 are required")


@torch.inference_mode()
def down_projection_stats(model: nn.Module, projections: list[DownProjection],
                          input_ids: torch.Tensor) -> tuple[list[LayerStats], dict[str, torch.Tensor]]:
    """One forward pass with hooks: per-layer activation extremes and each layer's input x: [S, in]."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(module, args, output):
            inputs[name] = args[0][0].detach().float()  # [S, in], batch of one
            outputs[name] = output[0].detach().float()  # [S, out]
        return capture

    with forward_hooks([(p.module, hook(p.name)) for p in projections]):
        model(input_ids=input_ids[None].to(next(model.parameters()).device), use_cache=False)
    stats = []
    for p in projections:
        x, y = inputs[p.name].abs(), outputs[p.name].abs()
        t, row = divmod(int(y.argmax()), y.shape[1])
        stats.append(LayerStats(layer=p.layer, module=p.name, max_abs_input=float(x.max()),
                                input_channel=int(x.argmax()) % x.shape[1], max_abs_output=float(y[t, row]),
                                output_channel=row, token_position=t, median_abs_output=float(y.median())))
    return stats, inputs


@contextlib.contextmanager
def zeroed(projections: dict[str, DownProjection], weights: list[SuperWeight]) -> Iterator[None]:
    """Temporarily zero the given weights; the original values come back even on error."""
    saved = [(projections[w.module], w.row, w.col, projections[w.module].get(w.row, w.col)) for w in weights]
    try:
        for p, row, col, _ in saved:
            p.set(row, col, 0.0)
        yield
    finally:
        for p, row, col, value in reversed(saved):
            p.set(row, col, value)


def _spike_candidates(model: nn.Module, projections: list[DownProjection], prompt_ids: torch.Tensor,
                      settings: DetectionSettings) -> tuple[list[SuperWeight], list[LayerStats]]:
    by_name = {p.name: p for p in projections}
    candidates: list[SuperWeight] = []
    first_stats: list[LayerStats] = []
    with contextlib.ExitStack() as stack:
        for _ in range(settings.max_candidates):
            stats, inputs = down_projection_stats(model, projections, prompt_ids)
            first_stats = first_stats or stats
            spiking = [s for s in stats if s.spike >= settings.spike_ratio]
            if not spiking:
                break
            top = max(spiking, key=lambda s: s.max_abs_output)
            if candidates and top.max_abs_output < settings.min_spike_fraction * candidates[0].output_magnitude:
                break
            proj = by_name[top.module]
            x = inputs[proj.name][top.token_position]  # [in]
            contrib = (x * proj.weight_matrix()[top.output_channel].detach().float()).abs()  # [in]
            col = int(contrib.argmax())
            weight = SuperWeight(layer=top.layer, module=top.module, row=top.output_channel, col=col,
                                 value=proj.get(top.output_channel, col), input_magnitude=float(x[col].abs()),
                                 output_magnitude=top.max_abs_output)
            if weight.value == 0.0:
                break  # the spike does not come from a single weight we can remove
            candidates.append(weight)
            stack.enter_context(zeroed(by_name, [weight]))
    return candidates, first_stats


def _largest_other_weights(projections: list[DownProjection], exclude: list[SuperWeight], k: int) -> list[SuperWeight]:
    """The k largest-|w| down-projection weights that are not in `exclude` (the control group)."""
    skip = {(w.module, w.row, w.col) for w in exclude}
    pool: list[SuperWeight] = []
    for p in projections:
        w = p.weight_matrix().detach()
        flat = w.abs().flatten().topk(min(k + len(skip), w.numel())).indices
        for flat_index in flat.tolist():
            row, col = divmod(flat_index, w.shape[1])
            if (p.name, row, col) not in skip:
                pool.append(SuperWeight(layer=p.layer, module=p.name, row=row, col=col,
                                        value=float(w[row, col]), input_magnitude=0.0, output_magnitude=0.0))
    return sorted(pool, key=lambda w: -abs(w.value))[:k]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated on a GPU (since the last reset_peak_memory_stats), else the
    process's peak resident set size (a high-water mark: it never goes down)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


# -- verification ----------------------------------------------------------------------------------------------


def _at_least(diff: torch.Tensor, bound: float, margin: float, final: bool) -> bool | None:
    """Whether mean(diff) >= bound, diff: [N] per-token log-ratios; None when a screen cannot tell."""
    mean = float(diff.mean())
    if final:
        return mean >= bound
    error = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else math.inf
    if abs(mean - bound) < max(SCREEN_STANDARD_ERRORS * error, margin):
        return None
    return mean >= bound


def _either(a: bool | None, b: bool | None) -> bool | None:
    return True if a is True or b is True else (None if a is None or b is None else False)


def _both(a: bool | None, b: bool | None) -> bool | None:
    return False if a is False or b is False else (None if a is None or b is None else True)


def _exp_mean(x: torch.Tensor) -> float:
    """exp(mean(x)): a perplexity from per-token NLLs, a perplexity ratio from per-token log-ratios (finite even for
    a broken model)."""
    return math.exp(min(float(x.mean()), 700.0))


def _ratio(scorer: AblationScorer, weights: list[SuperWeight]) -> float:
    """Perplexity with `weights` removed over the intact model's, on the scorer's tokens."""
    return _exp_mean(scorer.losses([weights])[0] - scorer.baseline)


class Verification:
    """Every removal behind the verdicts: on the screen first, on all evaluation tokens when the screen cannot tell.

    The rule, in the order the candidates were found: confirm a candidate whose removal alone costs min_effect, or
    whose removal on top of the ones confirmed before it costs min_effect *and* at least half the log-perplexity
    those already cost. The second clause accepts a partner that takes over when the first is gone (as in
    SmolLM2), and rejects the noise of an already-broken model, where any small change moves perplexity by a few x.
    """

    def __init__(self, model: nn.Module, projections: list[DownProjection], eval_text: EvalText,
                 settings: DetectionSettings):
        self.settings = settings
        self.ids = eval_text.ids[: settings.eval_tokens]
        windows = eval_windows(self.ids, settings.window, eval_text.bos_id)
        self.full = AblationScorer(model, projections, windows, reuse_prefix=False, head_tokens=settings.screen_tokens)
        self.screen = self.full.head  # the first screen_tokens tokens, its baseline from the pass above
        self.escalated = 0  # verdicts measured on all tokens

    def verify(self, candidates: list[SuperWeight]) -> list[SuperWeight]:
        """Fill in each candidate's perplexity numbers; return the confirmed ones, in order."""
        self.screen.losses([[w] for w in candidates])  # every candidate alone, batched
        confirmed: list[SuperWeight] = []
        for w in candidates:
            verdict = self._judge(self.screen, w, confirmed, final=False)
            if verdict is None:
                self.escalated += 1
                verdict = self._judge(self.full, w, confirmed, final=True)
            if verdict:
                confirmed.append(w)
        return confirmed

    def _judge(self, scorer: AblationScorer, w: SuperWeight, confirmed: list[SuperWeight],
               final: bool) -> bool | None:
        threshold = math.log(self.settings.min_effect)
        margin = SCREEN_MARGIN * threshold
        removed = scorer.losses([[w]])[0]
        alone = removed - scorer.baseline  # [N] per-token log-ratios
        conditional, verdict_conditional = alone, False
        if confirmed:
            before, together = scorer.losses([confirmed, confirmed + [w]])
            conditional = together - before
            damage = before - scorer.baseline
            verdict_conditional = _both(_at_least(conditional, threshold, margin, final),
                                        _at_least(conditional - 0.5 * damage, 0.0, margin, final))
        verdict = _either(_at_least(alone, threshold, margin, final), verdict_conditional)
        w.perplexity_removed = _exp_mean(removed)
        w.perplexity_ratio = _exp_mean(alone)
        w.conditional_ratio = _exp_mean(conditional)
        w.tokens = scorer.tokens
        return verdict

    def controls(self, projections: list[DownProjection], confirmed: list[SuperWeight]) -> dict:
        """All super weights removed together, and the two controls, on the screen (one batched forward)."""
        matched = _largest_other_weights(projections, confirmed, len(confirmed)) if confirmed else []
        largest = _largest_other_weights(projections, confirmed, self.settings.control_weights)
        sets = [s for s in (confirmed, matched, largest) if s]
        self.screen.losses(sets)
        screen_base = _exp_mean(self.screen.baseline)

        def entry(name: str, weights: list[SuperWeight]) -> dict:
            if not weights:
                return {f"{name}_perplexity": None, f"{name}_ratio": None}
            ratio = _ratio(self.screen, weights)
            return {f"{name}_perplexity": _exp_mean(self.screen.losses([weights])[0]), f"{name}_ratio": ratio}

        return {"screen_tokens": self.screen.tokens, "screen_baseline_perplexity": screen_base,
                **entry("removed", confirmed), **entry("control", matched), "control_weights": len(matched),
                **entry("largest_control", largest), "largest_control_weights": len(largest)}


# -- super activations -----------------------------------------------------------------------------------------


@torch.inference_mode()
def residual_streams(model: nn.Module, projections: list[DownProjection], prompt_ids: torch.Tensor,
                     sets: list[list[SuperWeight]]) -> list[dict[int, torch.Tensor]]:
    """Per removal set ([]: the intact model), layer -> the block's output hidden states [S, D] on the prompt with
    that set's weights removed; one batched forward pass."""
    residual: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def capture(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            residual[layer] = h.detach().float()  # [len(sets), S, D]
        return capture

    blocks = decoder_blocks(model, projections)
    ids = prompt_ids[None].repeat(len(sets), 1).to(next(model.parameters()).device)  # [len(sets), S]
    with forward_hooks([(m, hook(layer)) for layer, m in blocks.items()]), \
            removals({p.name: p for p in projections}, sets):
        model(input_ids=ids, use_cache=False)
    return [{layer: h[j] for layer, h in residual.items()} for j in range(len(sets))]


@dataclass(frozen=True)
class _Massive:
    channel: int
    layer: int  # first layer at >= PERSIST x peak
    last_layer: int
    token_position: int
    value: float


def _massive(residual: dict[int, torch.Tensor], channel: int, spike_ratio: float) -> _Massive | None:
    """The channel's massive activation: present when its peak stands spike_ratio x above its layer's median."""
    layers = sorted(residual)
    magnitude = {layer: float(residual[layer][:, channel].abs().max()) for layer in layers}
    peak_layer = max(layers, key=magnitude.get)
    peak = magnitude[peak_layer]
    if peak < spike_ratio * float(residual[peak_layer].abs().median()):
        return None
    first = next(layer for layer in layers if magnitude[layer] >= PERSIST * peak)
    last = first
    for layer in layers[layers.index(first) + 1:]:
        if magnitude[layer] < PERSIST * peak:
            break
        last = layer
    t = int(residual[first][:, channel].abs().argmax())
    return _Massive(channel, first, last, t, float(residual[first][t, channel]))


def super_activations(model: nn.Module, projections: list[DownProjection], prompt_ids: torch.Tensor,
                      tokens: list[str], stats: list[LayerStats], candidates: list[SuperWeight],
                      confirmed: list[SuperWeight], settings: DetectionSettings,
                      ratio=None) -> list[SuperActivation]:
    """Every massive residual-stream activation in a channel the scan points at (a spiking layer's output channel,
    a candidate's row), with its feeders: the candidates in its row at or before the layer where it appears.

    Args:
        ratio: removal set -> eval perplexity ratio (Verification's screen); None leaves those ratios out.
    """
    (residual,) = residual_streams(model, projections, prompt_ids, [[]])
    channels = {s.output_channel for s in stats if s.spike >= settings.spike_ratio} | {w.row for w in candidates}
    massive = [m for m in (_massive(residual, c, settings.spike_ratio) for c in sorted(channels)) if m is not None]
    feeders = [[w for w in candidates if w.row == m.channel and w.layer <= m.layer] for m in massive]
    # the activation with each feeder zeroed alone, and with all of an activation's feeders zeroed: one pass
    sets = [[w] for weights in feeders for w in weights] + [weights for weights in feeders if weights]
    removed = iter(residual_streams(model, projections, prompt_ids, sets) if sets else [])
    values = [[float(next(removed)[m.layer][m.token_position, m.channel]) for _ in weights]
              for m, weights in zip(massive, feeders)]
    together = [float(next(removed)[m.layer][m.token_position, m.channel]) if weights else None
                for m, weights in zip(massive, feeders)]
    found = []
    for m, weights, alone, all_removed in zip(massive, feeders, values, together):
        fed = [Feeder(layer=w.layer, module=w.module, row=w.row, col=w.col, value=w.value, confirmed=w in confirmed,
                      perplexity_ratio=w.perplexity_ratio, value_removed=v) for w, v in zip(weights, alone)]
        found.append(SuperActivation(
            layer=m.layer, channel=m.channel, value=m.value, token_position=m.token_position,
            token=tokens[m.token_position], last_layer=m.last_layer, feeders=fed, value_removed=all_removed,
            perplexity_ratio_removed=ratio(weights) if weights and ratio else None,
            carried_by_super_weight=any(f.confirmed for f in fed)))
    return found


def published_agreement(config: dict, name: str | None, found: list[SuperWeight], entries=None) -> dict | None:
    """Where detection agrees with the directory of published super weights, coordinate by coordinate; None when
    no entry matches the model (compression.published.match).

    Returns:
        {"entry", "source", "url", "exact", "coordinates": [{"layer", "row", "col", "published", "detected",
        "note"}]}, "note" naming another source's disagreement where there is one.
    """
    from .published import agreement, match

    entry = match(config, name, entries)
    if entry is None:
        return None
    result = agreement(entry, found)

    def row(c, published: bool, detected: bool) -> dict:
        dispute = entry.dispute_of(c) or entry.dispute_for_alternative(c)
        note = "" if dispute is None else (f"{dispute.source} gives {dispute.alternative} for the published "
                                           f"{dispute.published}")
        return {"layer": c.layer, "row": c.row, "col": c.col, "published": published, "detected": detected,
                "note": note}

    return {"entry": entry.id, "source": str(entry.source), "url": entry.source.url, "exact": result.exact,
            "coordinates": [row(c, True, ok) for c, ok in result.published]
            + [row(c, False, True) for c in result.unpublished]}


def find_super_weights(model: nn.Module, tokenizer, eval_text: EvalText, *, prompt: str = DEFAULT_PROMPT,
                       settings: DetectionSettings = DetectionSettings(), model_info: dict | None = None,
                       progress: bool = True) -> SuperWeightReport:
    """Locate a model's super weights from one prompt and verify each by its effect on perplexity.

    Args:
        model: a causal LM in eval mode (its weights are restored before this returns).
        tokenizer: the model's tokenizer.
        eval_text: the text whose perplexity decides which candidates are super weights.
        prompt: the single detection prompt (tokenized with the tokenizer's special tokens, BOS included).
        settings: thresholds; see DetectionSettings.
        model_info: identity of the model for the report (name, source, sha256, ...).
        progress: show a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    timings: dict = {"memory_mib": {}}
    bar = tqdm(total=5, desc="detecting super weights", disable=not progress, unit="phase")
    device = next(model.parameters()).device

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        bar.set_postfix_str(name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 3)
        timings["memory_mib"][name] = peak_memory_mib(device)
        bar.update(1)

    projections = find_down_projections(model)
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    with phase("scan"):
        candidates, stats = _spike_candidates(model, projections, prompt_ids, settings)
    with phase("baseline"):
        verification = Verification(model, projections, eval_text, settings)
    with phase("verify"):
        confirmed = verification.verify(candidates)
    with phase("controls"):
        measured = verification.controls(projections, confirmed)
    with phase("activations"):
        tokens = [tokenizer.decode([i]) for i in prompt_ids.tolist()]
        activations = super_activations(model, projections, prompt_ids, tokens, stats, candidates, confirmed,
                                        settings, ratio=lambda weights: _ratio(verification.screen, weights))
    bar.close()
    timings["evaluation_forwards"] = verification.full.forwards + verification.screen.forwards
    timings["escalated_verdicts"] = verification.escalated
    log.info("detection: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))

    config = model.config
    info = {"architecture": type(model).__name__, "num_layers": len({p.layer for p in projections}),
            "hidden_size": hidden_size(model), "intermediate_size": projections[0].weight_matrix().shape[1],
            "model_type": getattr(config, "model_type", None)}
    info.update(model_info or {})
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    bos = eval_text.bos_id
    return SuperWeightReport(
        model=info, prompt=prompt, created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        eval={"text": eval_text.name, "sha256": eval_text.sha256, "tokens": int(verification.ids.numel()),
              "window": settings.window, "bos": bos is not None, "bos_token_id": bos,
              "baseline_perplexity": _exp_mean(verification.full.baseline), **measured},
        super_weights=confirmed, rejected_candidates=[w for w in candidates if w not in confirmed],
        super_activations=activations, layer_stats=stats, settings=asdict(settings),
        published=published_agreement(config_dict, info.get("name") or info.get("source"), confirmed),
        timings=timings)
