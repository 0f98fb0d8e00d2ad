"""What a server does once before it serves: resolve the model (an artifact, declared super weights, or detection
in a child process), then, with the engine running, check that the engine computes with the report's super
weights and perplexity, and fix the canary's probe text."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from superweights.compression.errors import UserError
from superweights.compression.evaluation import EvalText
from superweights.compression.format import BASE, REMOVED, Quantization, read_quantization
from superweights.compression.report import SuperWeightReport

from .engine import PluginMissingError, SuperWeightEngine, installed_engine

log = logging.getLogger(__name__)


class StartupError(UserError):
    """The server cannot start with this configuration, or the served model disagrees with the report."""


@dataclass(frozen=True)
class ResolvedModel:
    """The model a server serves, resolved once: its checkpoint, report, ready adapters and quantization."""

    checkpoint: object  # compression.models.Checkpoint
    report: SuperWeightReport
    adapters: dict[str, Path] = field(default_factory=dict)  # an artifact's own, by variant name
    quantization: Quantization = field(default_factory=Quantization)


def resolve_model(config) -> ResolvedModel:
    """A `superweights compress` artifact, verified against its manifest and held to its own offline evaluation,
    with its own adapters; the declared super weights (--super-weights), unverified; or any other source with its
    (cached) detection report, whose adapters the engine writes. `config`: server.app.ServeConfig."""
    from superweights.compression.artifact import artifact_adapters, is_artifact, open_artifact
    from superweights.compression.declared import config_only_checkpoint, declared_report
    from superweights.compression.models import resolve_checkpoint

    if is_artifact(config.model):
        artifact = open_artifact(config.model)
        resolved = ResolvedModel(artifact.checkpoint, artifact.served_report, artifact_adapters(artifact),
                                 read_quantization(artifact.path))
    elif config.super_weights:
        dummy = config.engine.engine_options.get("load_format") == "dummy"
        if dummy and not config.model:
            raise StartupError("--engine-arg load_format=dummy needs a model directory (config.json and tokenizer)")
        checkpoint = config_only_checkpoint(config.model) if dummy else resolve_checkpoint(config.model)
        resolved = ResolvedModel(checkpoint, declared_report(checkpoint, list(config.super_weights)),
                                 quantization=read_quantization(checkpoint.path))
    else:
        checkpoint, report = _detect_in_child(config)
        resolved = ResolvedModel(checkpoint, report, quantization=read_quantization(checkpoint.path))
    _require_plugin(resolved.quantization)
    return resolved


def served_engine_config(config, resolved: ResolvedModel):
    """The engine config of a resolved model: its checkpoint, served under the model's name."""
    checkpoint = resolved.checkpoint
    return replace(config.engine, checkpoint=Path(checkpoint.path), engine_options={
        "served_model_name": checkpoint.name, **config.engine.engine_options})


def _require_plugin(quantization: Quantization) -> None:
    """An artifact's quant_method "superweights" exists only through our vLLM plugin: say so before vLLM does."""
    from importlib.metadata import entry_points

    if quantization.needs_plugin and not any(
            e.name == "superweights" for e in entry_points(group="vllm.general_plugins")):
        raise PluginMissingError("this artifact needs the superweights vLLM plugin, which is not installed in this "
                                 "environment: `pip install -e .` (or `pip install --no-deps .`) in the superweights "
                                 "checkout registers it")


def _detect_in_child(config):
    """Detection in a child process that exits before vLLM starts: whatever it loaded (the whole model in the
    offline dtype, a CUDA context and its cached blocks) is returned to the system, so the engine never shares
    the machine with a second resident copy of the weights. A cached report costs no child."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from superweights.compression.pipeline import cached_report

    placement = {"device": config.offline_device, "dtype": config.offline_dtype}
    if config.use_cache:
        cached = cached_report(config.model, prompt=config.prompt, settings=config.detection,
                               eval_path=config.eval_text, **placement)
        if cached is not None:
            return cached
    log.info("detecting super weights in a child process (released before the engine starts)")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_detect, config.model, config.prompt, config.detection, config.eval_text,
                           placement, config.use_cache).result()


def _detect(model, prompt, settings, eval_path, placement, use_cache):
    from superweights.compression.pipeline import detect

    return detect(model, prompt=prompt, settings=settings, eval_path=eval_path, use_cache=use_cache, **placement)


def model_info(engine: SuperWeightEngine, resolved: ResolvedModel, max_tokens: int, front_ends: int = 1,
               front_end: int = 0) -> dict:
    """GetModelInfoResponse's fields but the variants (those change as scaled arms come and go)."""
    checkpoint = resolved.checkpoint
    return {"model_name": checkpoint.name, "model_sha256": checkpoint.sha256, "checkpoint": Path(checkpoint.path).name,
            "dtype": engine.dtype, "quantization": resolved.quantization.describe(), "engine": installed_engine(),
            "device": "cpu" if engine.cpu else "cuda", "max_model_len": engine.config.max_model_len,
            "max_tokens_limit": max_tokens, "front_ends": front_ends, "front_end": front_end,
            **engine.parallelism()}


async def check_served_super_weights(engine: SuperWeightEngine) -> list[float] | None:
    """Every reported super weight, as the engine computes with it, equals the report's value (relative 1e-4 in
    float32; 16-bit outputs round at 2^-8, so 1% there)."""
    values = await engine.served_super_weights()
    if values is None:
        log.info("self-check: no engine worker reported every super weight; not probed (see the warning above)")
        return None
    tolerance = 1e-4 if engine.dtype == "float32" else 1e-2
    protected = engine.report.model.protected  # False: an artifact made with --no-protect
    for w, served in zip(engine.report.super_weights, values):
        log.info("self-check: %s[%d, %d] served %+.6f, report %+.6f", w.module, w.row, w.col, served, w.value)
        if abs(served - w.value) > tolerance * abs(w.value):
            if not protected:
                log.warning("self-check: this artifact was made without protection; the engine computes "
                            "%s[%d, %d] as %+.6f, the report says %+.6f", w.module, w.row, w.col, served, w.value)
                continue
            raise StartupError(f"the engine computes {w.module}[{w.row}, {w.col}] as {served:+.6f}, the report says "
                               f"{w.value:+.6f}: the served weights do not hold this super weight")
    return values


async def self_check(engine: SuperWeightEngine, eval_text: EvalText, tolerance: float | None = None
                     ) -> dict[str, float]:
    """The served weights against the report, through the engine: base perplexity on the report's evaluation tokens
    (in the report's windows, BOS first where the tokenizer adds one) must match the offline baseline, and removing
    the super weights must cost at least min_effect. Returns those two perplexities (the one-weight arms are left to
    the canary's first run: nothing checks them here).

    Args:
        tolerance: relative; None: 2% when serving float32, 10% in 16-bit (bfloat16 rounding alone moves a 135M
            model's perplexity by a few percent).
    """
    report = engine.report
    if report.model.declared:  # nothing offline to hold the engine to; the values were probed or read
        await check_served_super_weights(engine)
        log.info("self-check: super weights declared (%s), not verified by detection",
                 ", ".join(report.settings.declared))
        return {}
    facts = report.evaluation
    eval_ids = eval_text.ids[: facts.tokens].tolist()
    arms = [BASE, REMOVED] if report.super_weights else [BASE]
    served = dict(zip(arms, await asyncio.gather(*(
        engine.perplexity(eval_ids, engine.resolve(a), facts.window, eval_text.bos_id) for a in arms))))
    offline = facts.baseline_perplexity
    drift = abs(served[BASE] / offline - 1)
    float32 = engine.dtype == "float32" and facts.dtype == "float32"
    tolerance = tolerance or (0.02 if float32 else 0.10)
    log.info("self-check: base perplexity %.3f through the engine, %.3f offline (%.2f%%)", served[BASE], offline,
             100 * drift)
    if drift > tolerance:
        raise StartupError(f"the served model disagrees with its report: perplexity {served[BASE]:.3f} through "
                           f"the engine against {offline:.3f} offline ({100 * drift:.1f}% apart)")
    if report.super_weights:
        await check_served_super_weights(engine)
        ratio = served[REMOVED] / served[BASE]
        log.info("self-check: without super weights perplexity x%.1f (report, on its screen: x%.1f)", ratio,
                 facts.removed_ratio)
        if ratio < report.min_effect:
            raise StartupError(f"removing the reported super weights through the engine changed perplexity only "
                               f"x{ratio:.2f}: the served weights do not hold them")
    return served


def canary_probe(eval_text: EvalText, window: int) -> list[int]:
    """The canary's fixed probe: the evaluation text's first window (BOS included where the tokenizer adds one)."""
    return eval_text.ids[: window - (eval_text.bos_id is not None)].tolist()
