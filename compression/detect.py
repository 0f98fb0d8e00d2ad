"""Data-free super-weight detection (Yu et al., "The Super Weight in Large Language Models"), with verification.

1. One prompt, hooks on every MLP down-projection. A layer whose max |output| spikes far above its median |output|
   (a massive activation) gives the row (the spiking output channel); the column is the input channel that
   contributes most to that
   output, `argmax_c |x[t, c] * W[row, c]|`, which is the input spike. Zero that weight, run again, repeat until no
   layer spikes.
2. Verification: each candidate's effect on the perplexity of an evaluation text, alone and on top of the
   candidates confirmed before it. Only candidates whose removal costs real perplexity are super weights; the rest
   are reported as rejected. A control zeroes as many of the largest other down-projection weights.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import DownProjection, find_down_projections, hidden_size
from .errors import UserError
from .evaluation import EvalText, perplexity

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
REPORT_SCHEMA = "superweights.report/v1"


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
    perplexity_ratio: float | None = None  # perplexity_removed / baseline
    conditional_ratio: float | None = None  # ppl(this + super weights confirmed before it removed) / ppl(those removed)

    @property
    def parameter(self) -> str:
        """Its parameter's name, e.g. "model.layers.3.mlp.down_proj.weight"."""
        return f"{self.module}.weight"


@dataclass(frozen=True)
class SuperActivation:
    layer: int  # block whose output carries it
    channel: int
    value: float
    token_position: int
    token: str


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
            super_activations=[SuperActivation(**a) for a in d["super_activations"]],
            layer_stats=[LayerStats(**_module_named(s)) for s in d["layer_stats"]], settings=d["settings"])

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
    eval_tokens: int = 1024  # tokens of the evaluation text used for verification
    window: int = 512

    def __post_init__(self) -> None:
        if self.spike_ratio <= 1 or self.min_effect <= 1:
            raise UserError("spike_ratio and min_effect must be > 1")
        if not 0 <= self.min_spike_fraction < 1:
            raise UserError("min_spike_fraction must be in [0, 1)")
        if self.max_candidates < 1 or self.eval_tokens < 16 or self.window < 2:
            raise UserError("max_candidates >= 1, eval_tokens >= 16 and window >= 2 are required")


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Within the block, each (module, hook) pair's forward hook is registered; removed even on error."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
        model(input_ids=input_ids[None])
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


@torch.inference_mode()
def super_activations(model: nn.Module, projections: list[DownProjection], prompt_ids: torch.Tensor,
                      channels: list[int], tokens: list[str], keep: float = 0.25) -> list[SuperActivation]:
    """Residual-stream values of `channels` at every block output where they stay >= `keep` x their peak."""
    blocks: dict[int, nn.Module] = {}
    for p in projections:
        prefix = p.name[: p.name.index(f".{p.layer}.") + len(f".{p.layer}")]
        blocks.setdefault(p.layer, model.get_submodule(prefix))
    residual: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def capture(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            residual[layer] = h[0].detach().float()  # [S, D]
        return capture

    with forward_hooks([(m, hook(layer)) for layer, m in blocks.items()]):
        model(input_ids=prompt_ids[None])
    found = []
    for channel in sorted(set(channels)):
        per_layer = {layer: h[:, channel] for layer, h in sorted(residual.items())}  # layer -> [S]
        peak = max(float(v.abs().max()) for v in per_layer.values())
        for layer, v in per_layer.items():
            t = int(v.abs().argmax())
            if abs(float(v[t])) >= keep * peak:
                found.append(SuperActivation(layer=layer, channel=channel, value=float(v[t]), token_position=t,
                                             token=tokens[t]))
    return found


def find_super_weights(model: nn.Module, tokenizer, eval_text: EvalText, *, prompt: str = DEFAULT_PROMPT,
                       settings: DetectionSettings = DetectionSettings(), model_info: dict | None = None,
                       progress: bool = True) -> SuperWeightReport:
    """Locate a model's super weights from one prompt and verify each by its effect on perplexity.

    Args:
        model: a causal LM in eval mode (its weights are restored before this returns).
        tokenizer: the model's tokenizer.
        eval_text: the text whose perplexity decides which candidates are super weights.
        prompt: the single detection prompt.
        settings: thresholds; see DetectionSettings.
        model_info: identity of the model for the report (name, source, sha256, ...).
        progress: show a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    projections = find_down_projections(model)
    by_name = {p.name: p for p in projections}
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    eval_ids = eval_text.ids[: settings.eval_tokens]
    candidates, stats = _spike_candidates(model, projections, prompt_ids, settings)
    bar = tqdm(total=2 * len(candidates) + 1, desc="verifying super-weight candidates", disable=not progress,
               unit="eval")

    def ppl(removed: list[SuperWeight]) -> float:
        with zeroed(by_name, removed):
            value = perplexity(model, eval_ids, window=settings.window)
        bar.update(1)
        return value

    # In the order found: confirm a candidate whose removal alone costs min_effect, or whose removal on top of
    # the ones confirmed before it costs min_effect *and* at least half the log-perplexity those already cost.
    # The second clause accepts a partner that takes over when the first is gone (as in SmolLM2), and rejects
    # the noise of an already-broken model, where any small change moves perplexity by a few x.
    baseline = ppl([])
    confirmed: list[SuperWeight] = []
    removed_ppl = baseline
    threshold = math.log(settings.min_effect)
    for w in candidates:
        w.perplexity_removed = ppl([w])
        w.perplexity_ratio = w.perplexity_removed / baseline
        with_previous = ppl(confirmed + [w]) if confirmed else w.perplexity_removed
        w.conditional_ratio = with_previous / removed_ppl
        damage_so_far = math.log(removed_ppl / baseline)
        conditional = math.log(w.conditional_ratio)
        if math.log(w.perplexity_ratio) >= threshold or (conditional >= threshold
                                                         and conditional >= 0.5 * damage_so_far):
            confirmed.append(w)
            removed_ppl = with_previous
    bar.total = bar.n + (1 if confirmed else 0)
    rejected = [w for w in candidates if w not in confirmed]
    together = removed_ppl if confirmed else None
    control = ppl(_largest_other_weights(projections, confirmed, len(confirmed))) if confirmed else None
    bar.close()

    tokens = [tokenizer.decode([i]) for i in prompt_ids.tolist()]
    activations = super_activations(model, projections, prompt_ids, [w.row for w in confirmed], tokens)
    config = model.config
    info = {"architecture": type(model).__name__, "num_layers": len({p.layer for p in projections}),
            "hidden_size": hidden_size(model), "intermediate_size": projections[0].weight_matrix().shape[1],
            "model_type": getattr(config, "model_type", None)}
    info.update(model_info or {})
    return SuperWeightReport(
        model=info, prompt=prompt, created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        eval={"text": eval_text.name, "sha256": eval_text.sha256, "tokens": int(eval_ids.numel()),
              "window": settings.window, "baseline_perplexity": baseline, "removed_perplexity": together,
              "control_perplexity": control, "control_weights": len(confirmed)},
        super_weights=confirmed, rejected_candidates=rejected, super_activations=activations,
        layer_stats=stats, settings=asdict(settings))
