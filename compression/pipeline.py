"""Model source -> checkpoint -> verified report, with the report cached by everything that decides it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from .architectures import find_down_projections
from .detect import DEFAULT_PROMPT, DetectionSettings, SuperWeightReport, find_super_weights
from .evaluation import load_eval_text
from .models import Checkpoint, cache_dir, load_model, resolve_checkpoint

log = logging.getLogger(__name__)
DETECTOR_REVISION = 4  # bump when detection or the report's content changes: cached reports are then recomputed


def _report_key(checkpoint: Checkpoint, prompt: str, settings: DetectionSettings, eval_path: Path | None) -> str:
    from .evaluation import DEFAULT_EVAL_TEXT, EvalTextError

    try:
        eval_bytes = Path(eval_path or DEFAULT_EVAL_TEXT).read_bytes()
    except OSError as e:
        raise EvalTextError(f"cannot read evaluation text {eval_path}: {e.strerror}") from e
    material = json.dumps({"detector": DETECTOR_REVISION, "model": checkpoint.sha256, "prompt": prompt,
                           "settings": asdict(settings),
                           "eval": hashlib.sha256(eval_bytes).hexdigest()}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _report_path(checkpoint: Checkpoint, prompt: str, settings: DetectionSettings, eval_path: Path | None) -> Path:
    return cache_dir() / "reports" / f"{_report_key(checkpoint, prompt, settings, eval_path)}.json"


def _load_cached(path: Path) -> SuperWeightReport | None:
    if not path.is_file():
        return None
    try:
        return SuperWeightReport.load(path)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable cached report %s: %s", path, e)
        return None


def cached_report(source: str | None = None, *, prompt: str = DEFAULT_PROMPT,
                  settings: DetectionSettings | None = None,
                  eval_path: Path | None = None) -> tuple[Checkpoint, SuperWeightReport] | None:
    """(checkpoint, report) when detection already ran for exactly this model, prompt, settings and text."""
    checkpoint = resolve_checkpoint(source)
    report = _load_cached(_report_path(checkpoint, prompt, settings or DetectionSettings(), eval_path))
    return None if report is None else (checkpoint, report)


def detect(source: str | None = None, *, prompt: str = DEFAULT_PROMPT, settings: DetectionSettings | None = None,
           eval_path: Path | None = None, use_cache: bool = True,
           progress: bool = True) -> tuple[Checkpoint, SuperWeightReport]:
    """Resolve a model source and return its verified super-weight report (cached on disk by content).

    Args:
        source: None/"default", a .gguf file or a checkpoint directory (see resolve_checkpoint).
        prompt: the detection prompt.
        settings: detection thresholds.
        eval_path: evaluation text; the bundled Moby-Dick chapters by default.
        use_cache: reuse a report computed before for the same model, prompt, settings and text.
        progress: progress bars on stderr.
    """
    settings = settings or DetectionSettings()
    checkpoint = resolve_checkpoint(source)
    cached = _report_path(checkpoint, prompt, settings, eval_path)
    if use_cache and (report := _load_cached(cached)) is not None:
        return checkpoint, report
    model, tokenizer = load_model(checkpoint)
    find_down_projections(model)  # fail on an unsupported structure before any work
    eval_text = load_eval_text(tokenizer, eval_path)
    report = find_super_weights(model, tokenizer, eval_text, prompt=prompt, settings=settings, progress=progress,
                                model_info={"name": checkpoint.name, "source": checkpoint.source,
                                            "sha256": checkpoint.sha256})
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(report.to_json())
    os.replace(tmp, cached)
    return checkpoint, report
