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
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from .ablation import AblationScorer, decoder_blocks, forward_hooks, removals
from .architectures import DownProjection, find_down_projections, hidden_size
from .evaluation import EvalText, eval_windows
from .models import Checkpoint
from .report import (
    DetectionSettings,
    EvalFacts,
    Feeder,
    LayerStats,
    ModelFacts,
    PublishedAgreement,
    PublishedCoordinate,
    SuperActivation,
    SuperWeight,
    SuperWeightReport,
)

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
# A screen verdict stands when its margin exceeds this many standard errors of the per-token log-ratio...
SCREEN_STANDARD_ERRORS = 4.0
# ...and this fraction of log(min_effect): the screen is one passage, so a near call is remeasured on all tokens.
SCREEN_MARGIN = 0.25
PERSIST = 0.25  # a super activation persists through the layers where it keeps this fraction of its peak


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

    def verify(self, candidates: list[SuperWeight]) -> tuple[list[SuperWeight], list[SuperWeight]]:
        """Each candidate with its perplexity numbers, and the confirmed ones among them; both in order."""
        self.screen.losses([[w] for w in candidates])  # every candidate alone, batched
        measured: list[SuperWeight] = []
        confirmed: list[SuperWeight] = []
        for w in candidates:
            verdict, w = self._judge(self.screen, w, confirmed, final=False)
            if verdict is None:
                self.escalated += 1
                verdict, w = self._judge(self.full, w, confirmed, final=True)
            measured.append(w)
            if verdict:
                confirmed.append(w)
        return measured, confirmed

    def _judge(self, scorer: AblationScorer, w: SuperWeight, confirmed: list[SuperWeight],
               final: bool) -> tuple[bool | None, SuperWeight]:
        """The verdict on w (None: the screen cannot tell) and w with the numbers behind it."""
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
        return verdict, replace(w, perplexity_removed=_exp_mean(removed), perplexity_ratio=_exp_mean(alone),
                                conditional_ratio=_exp_mean(conditional), tokens=scorer.tokens)

    def eval_facts(self, projections: list[DownProjection], confirmed: list[SuperWeight], eval_text: EvalText,
              device: torch.device, dtype: torch.dtype) -> EvalFacts:
        """The baseline, and on the screen (one batched forward) all super weights removed together and the two
        controls: as many of the largest other down-projection weights, and the control_weights largest."""
        matched = _largest_other_weights(projections, confirmed, len(confirmed)) if confirmed else []
        largest = _largest_other_weights(projections, confirmed, self.settings.control_weights)
        self.screen.losses([s for s in (confirmed, matched, largest) if s])

        def perplexity(weights: list[SuperWeight]) -> float | None:
            return _exp_mean(self.screen.losses([weights])[0]) if weights else None

        def ratio(weights: list[SuperWeight]) -> float | None:
            return _ratio(self.screen, weights) if weights else None

        return EvalFacts(
            text=eval_text.name, sha256=eval_text.sha256, tokens=int(self.ids.numel()), window=self.settings.window,
            bos=eval_text.bos_id is not None, bos_token_id=eval_text.bos_id,
            baseline_perplexity=_exp_mean(self.full.baseline), screen_tokens=self.screen.tokens,
            screen_baseline_perplexity=_exp_mean(self.screen.baseline), removed_perplexity=perplexity(confirmed),
            removed_ratio=ratio(confirmed), control_perplexity=perplexity(matched), control_ratio=ratio(matched),
            control_weights=len(matched), largest_control_perplexity=perplexity(largest),
            largest_control_ratio=ratio(largest), largest_control_weights=len(largest), device=device.type,
            dtype=str(dtype).removeprefix("torch."))


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


def published_agreement(config: dict, name: str | None, found: list[SuperWeight],
                        entries=None) -> PublishedAgreement | None:
    """Where detection agrees with the directory of published super weights, coordinate by coordinate, each
    with a note naming another source's disagreement where there is one; None when no entry matches the model
    (compression.published.match)."""
    from .published import agreement, match

    entry = match(config, name, entries)
    if entry is None:
        return None
    result = agreement(entry, found)

    def row(c, published: bool, detected: bool) -> PublishedCoordinate:
        dispute = entry.dispute_of(c) or entry.dispute_for_alternative(c)
        note = "" if dispute is None else (f"{dispute.source} gives {dispute.alternative} for the published "
                                           f"{dispute.published}")
        return PublishedCoordinate(layer=c.layer, row=c.row, col=c.col, published=published, detected=detected,
                                   note=note)

    return PublishedAgreement(entry=entry.id, source=str(entry.source), url=entry.source.url, exact=result.exact,
                              coordinates=[row(c, True, ok) for c, ok in result.published]
                              + [row(c, False, True) for c in result.unpublished])


def model_facts(model: nn.Module, projections: list[DownProjection], checkpoint: Checkpoint | None) -> ModelFacts:
    """A model's facts for its report: its structure, and where it came from (None: a model built in memory)."""
    return ModelFacts(architecture=type(model).__name__, num_layers=len({p.layer for p in projections}),
                      hidden_size=hidden_size(model), intermediate_size=projections[0].weight_matrix().shape[1],
                      model_type=getattr(model.config, "model_type", None),
                      name=checkpoint.name if checkpoint else "", source=checkpoint.source if checkpoint else "",
                      sha256=checkpoint.sha256 if checkpoint else "")


def find_super_weights(model: nn.Module, tokenizer, eval_text: EvalText, *, prompt: str = DEFAULT_PROMPT,
                       settings: DetectionSettings = DetectionSettings(), checkpoint: Checkpoint | None = None,
                       progress: bool = True) -> SuperWeightReport:
    """Locate a model's super weights from one prompt and verify each by its effect on perplexity.

    Args:
        model: a causal LM in eval mode (its weights are restored before this returns).
        tokenizer: the model's tokenizer.
        eval_text: the text whose perplexity decides which candidates are super weights.
        prompt: the single detection prompt (tokenized with the tokenizer's special tokens, BOS included).
        settings: thresholds; see DetectionSettings.
        checkpoint: where the model came from, for the report (its name, source and sha256); None: a model built
            in memory.
        progress: show a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    timings: dict = {"memory_mib": {}}
    bar = tqdm(total=5, desc="detecting super weights", disable=not progress, unit="phase")
    parameter = next(model.parameters())
    device = parameter.device

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
        candidates, confirmed = verification.verify(candidates)
    with phase("controls"):
        evaluation = verification.eval_facts(projections, confirmed, eval_text, device, parameter.dtype)
    with phase("activations"):
        tokens = [tokenizer.decode([i]) for i in prompt_ids.tolist()]
        activations = super_activations(model, projections, prompt_ids, tokens, stats, candidates, confirmed,
                                        settings, ratio=lambda weights: _ratio(verification.screen, weights))
    bar.close()
    timings["evaluation_forwards"] = verification.full.forwards + verification.screen.forwards
    timings["escalated_verdicts"] = verification.escalated
    log.info("detection: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    name = checkpoint and (checkpoint.name or checkpoint.source)
    return SuperWeightReport(
        model=model_facts(model, projections, checkpoint), prompt=prompt,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), evaluation=evaluation,
        super_weights=confirmed, rejected_candidates=[w for w in candidates if w not in confirmed],
        super_activations=activations, layer_stats=stats, settings=settings,
        published=published_agreement(config, name, confirmed), timings=timings)
