"""The super-weight report: what detection found and measured, as written to report.json (schema REPORT_SCHEMA)
and served by GetSuperWeights. compression.detect computes it; everything else reads it through these types.

Every part is a frozen dataclass, built complete, its lists never changed either; a changed report is a new one
(dataclasses.replace, as in SuperWeightReport.with_values). The JSON layout is the dataclasses' own (asdict), with
two exceptions: the report's `evaluation` is written as "eval", and the model facts that only some reports have are
written only by those (ModelFacts.to_dict). from_dict reads exactly that layout: a report written by an older
revision raises ReportFormatError; cached ones are never read, their cache key holds the detector revision
(compression.pipeline.DETECTOR_REVISION).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

from .errors import UserError

REPORT_SCHEMA = "superweights.report/v1"
DEFAULT_MIN_EFFECT = 2.0  # removal multiplies evaluation perplexity by at least this much: a super weight


class ReportFormatError(UserError):
    """A JSON document that is not a report this version reads: another schema, or a report written before."""


@dataclass(frozen=True)
class DetectionSettings:
    """Knobs of detection and verification; the defaults suit models from 100M to 70B parameters."""

    spike_ratio: float = 100.0  # a layer spikes when its max |output| is this many times its median |output|
    max_candidates: int = 8
    # stop once the largest spike left is below this fraction of the first one: a super weight's partner is of the
    # same order (SmolLM2's second: 27% of the first), the noise left after removal is not (7% and below there)
    min_spike_fraction: float = 0.1
    min_effect: float = DEFAULT_MIN_EFFECT  # confirmed when removal multiplies eval perplexity by at least this much
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


@dataclass(frozen=True)
class DeclaredSettings:
    """The settings of a report whose super weights were declared (--super-weights), not detected."""

    declared: list[str]  # the coordinates as given, e.g. "layer 1 [788, 2427]"


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


@dataclass(frozen=True)
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
    last_layer: int  # last block output it persists through
    feeders: list[Feeder]
    value_removed: float | None  # the activation with every feeder zeroed together (None: no feeders)
    perplexity_ratio_removed: float | None  # eval perplexity x with every feeder zeroed (screen tokens)
    carried_by_super_weight: bool  # a feeder is a confirmed super weight; else no single weight carries it

    @classmethod
    def from_dict(cls, d: dict) -> SuperActivation:
        return _read(cls, d, feeders=[_read(Feeder, f) for f in d["feeders"]])


@dataclass(frozen=True)
class ModelFacts:
    """What a report says about its model (JSON "model")."""

    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    num_layers: int
    hidden_size: int
    intermediate_size: int  # the down-projection's input width
    model_type: str | None  # config.model_type
    name: str  # "" for a model that did not come from a checkpoint (built in memory)
    source: str
    sha256: str
    declared: bool = False  # super weights declared (--super-weights), not detected
    artifact: str | None = None  # served from this `superweights compress` artifact directory
    scheme: str | None = None  # that artifact's scheme label
    protected: bool = True  # False: an artifact made with --no-protect
    OPTIONAL: ClassVar[tuple[str, ...]] = ("declared", "artifact", "scheme", "protected")  # written only where set

    def to_dict(self) -> dict:
        """The JSON layout: "declared" only when true, the artifact's three facts only for an artifact."""
        d = asdict(self)
        if not self.declared:
            del d["declared"]
        if self.artifact is None:
            for name in ("artifact", "scheme", "protected"):
                del d[name]
        return d


@dataclass(frozen=True)
class EvalFacts:
    """What a report measured on its evaluation text (JSON "eval"). Ratios are perplexity over the intact model's on
    the same tokens; the removals and controls are measured on the screen (the first screen_tokens scored tokens)."""

    text: str  # the evaluation text's name
    sha256: str
    tokens: int  # scored by the baseline
    window: int
    bos: bool  # every window starts with BOS
    bos_token_id: int | None
    baseline_perplexity: float | None  # None: nothing measured (declared super weights)
    screen_tokens: int
    screen_baseline_perplexity: float | None
    removed_perplexity: float | None  # every super weight removed (None: there are none)
    removed_ratio: float | None
    control_perplexity: float | None  # as many of the largest other down-projection weights removed
    control_ratio: float | None
    control_weights: int
    largest_control_perplexity: float | None  # the paper's control: the largest_control_weights largest removed
    largest_control_ratio: float | None
    largest_control_weights: int
    device: str  # where the numbers were computed offline ("" when nothing was)
    dtype: str  # the offline dtype they were computed in

    @classmethod
    def unmeasured(cls) -> EvalFacts:
        """A report that measured nothing (declared super weights)."""
        return cls(text="", sha256="", tokens=0, window=DetectionSettings().window, bos=False, bos_token_id=None,
                   baseline_perplexity=None, screen_tokens=0, screen_baseline_perplexity=None, removed_perplexity=None,
                   removed_ratio=None, control_perplexity=None, control_ratio=None, control_weights=0,
                   largest_control_perplexity=None, largest_control_ratio=None, largest_control_weights=0, device="",
                   dtype="")


@dataclass(frozen=True)
class PublishedCoordinate:
    """One coordinate where detection and the directory of published super weights meet or part."""

    layer: int
    row: int
    col: int
    published: bool
    detected: bool
    note: str  # another source's disagreement about it; "" when none


@dataclass(frozen=True)
class PublishedAgreement:
    """Where detection agrees with the model's entry in the directory of published super weights."""

    entry: str  # the entry's id
    source: str
    url: str
    exact: bool  # every published coordinate detected, nothing else
    coordinates: list[PublishedCoordinate]

    @classmethod
    def from_dict(cls, d: dict) -> PublishedAgreement:
        return _read(cls, d, coordinates=[_read(PublishedCoordinate, c) for c in d["coordinates"]])


@dataclass(frozen=True)
class SuperWeightReport:
    model: ModelFacts
    prompt: str
    created_at: str
    evaluation: EvalFacts  # JSON "eval"
    super_weights: list[SuperWeight]
    rejected_candidates: list[SuperWeight]
    super_activations: list[SuperActivation]
    layer_stats: list[LayerStats]
    settings: DetectionSettings | DeclaredSettings
    schema: str = REPORT_SCHEMA
    published: PublishedAgreement | None = None  # None: no entry in the directory matches the model
    timings: dict = field(default_factory=dict)  # seconds per detection phase, "memory_mib" per phase

    @property
    def min_effect(self) -> float:
        """The perplexity factor a removal had to cost to confirm a super weight."""
        return self.settings.min_effect if isinstance(self.settings, DetectionSettings) else DEFAULT_MIN_EFFECT

    def with_values(self, values: list[float]) -> SuperWeightReport:
        """This report with its super weights' values replaced (declared super weights whose values the engine
        reported)."""
        return replace(self, super_weights=[replace(w, value=v) for w, v in zip(self.super_weights, values)])

    def to_dict(self) -> dict:
        """The report.json layout (REPORT_SCHEMA), JSON types only."""
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return {("eval" if name == "evaluation" else name): value for name, value in d.items()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> SuperWeightReport:
        """A report from exactly the layout to_dict writes.

        Raises:
            ReportFormatError: another schema, or a key missing or unknown (a report written by an older revision).
        """
        if d.get("schema") != REPORT_SCHEMA:
            raise ReportFormatError(f"not a {REPORT_SCHEMA} report (schema={d.get('schema')!r})")
        try:
            settings = d["settings"]
            return _read(cls, {("evaluation" if name == "eval" else name): value for name, value in d.items()},
                         model=_read(ModelFacts, d["model"], optional=ModelFacts.OPTIONAL),
                         evaluation=_read(EvalFacts, d["eval"]),
                         super_weights=[_read(SuperWeight, w) for w in d["super_weights"]],
                         rejected_candidates=[_read(SuperWeight, w) for w in d["rejected_candidates"]],
                         super_activations=[SuperActivation.from_dict(a) for a in d["super_activations"]],
                         layer_stats=[_read(LayerStats, s) for s in d["layer_stats"]],
                         settings=_read(DeclaredSettings if "declared" in settings else DetectionSettings, settings),
                         published=None if d["published"] is None else PublishedAgreement.from_dict(d["published"]))
        except (KeyError, TypeError) as e:  # a part missing before its fields could be checked, or not an object
            raise ReportFormatError(f"not a {REPORT_SCHEMA} report as this version writes it ({e!r}): written by "
                                    f"another version of superweights") from e

    @classmethod
    def load(cls, path: Path) -> SuperWeightReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _read(cls, d: dict, optional: tuple[str, ...] = (), **parts):
    """A cls from its JSON object d, which must hold every field but the `optional` ones and nothing else (a
    default does not stand in for a missing key: that is a report written before); parts: its nested objects,
    read already."""
    names = {f.name for f in fields(cls)}
    missing, unknown = names - set(optional) - set(d), set(d) - names
    if missing or unknown:
        wrong = [f"{what} {', '.join(sorted(keys))}" for what, keys in (("no", missing), ("unknown", unknown)) if keys]
        raise ReportFormatError(f"not a {REPORT_SCHEMA} report as this version writes it ({cls.__name__}: "
                                f"{'; '.join(wrong)}): written by another version of superweights")
    return cls(**dict(d, **parts))
