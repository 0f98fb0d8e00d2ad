"""Model source -> checkpoint -> verified report, with the report cached by everything that decides it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from .architectures import find_down_projections
from .detect import DEFAULT_PROMPT, find_super_weights, peak_memory_mib
from .evaluation import load_eval_text
from .fsutil import write_atomic
from .models import Checkpoint, cache_dir, load_model, offline_placement, resolve_checkpoint
from .report import DetectionSettings, SuperWeightReport

log = logging.getLogger(__name__)
DETECTOR_REVISION = 6  # bump when detection or the report's content or layout changes: cached reports are recomputed


def _report_key(checkpoint: Checkpoint, prompt: str, settings: DetectionSettings, eval_path: Path | None,
                placement: tuple[str, str]) -> str:
    from .evaluation import DEFAULT_EVAL_TEXT, EvalTextError

    try:
        eval_bytes = Path(eval_path or DEFAULT_EVAL_TEXT).read_bytes()
    except OSError as e:
        raise EvalTextError(f"cannot read evaluation text {eval_path}: {e.strerror}") from e
    material = {"detector": DETECTOR_REVISION, "model": checkpoint.sha256, "prompt": prompt,
                "settings": asdict(settings), "eval": hashlib.sha256(eval_bytes).hexdigest(),
                "placement": list(placement)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _report_path(checkpoint: Checkpoint, prompt: str, settings: DetectionSettings, eval_path: Path | None,
                 placement: tuple[str, str]) -> Path:
    return cache_dir() / "reports" / f"{_report_key(checkpoint, prompt, settings, eval_path, placement)}.json"


def _load_cached(path: Path) -> SuperWeightReport | None:
    if not path.is_file():
        return None
    try:
        return SuperWeightReport.load(path)
    except ValueError as e:  # not JSON, or not a report this revision wrote (ReportFormatError)
        log.warning("ignoring unreadable cached report %s: %s", path, e)
        return None


def cached_report(source: str | None = None, *, prompt: str = DEFAULT_PROMPT,
                  settings: DetectionSettings | None = None, eval_path: Path | None = None, device: str = "auto",
                  dtype: str = "auto") -> tuple[Checkpoint, SuperWeightReport] | None:
    """(checkpoint, report) when detection already ran for exactly this model, prompt, settings, text and
    offline device and dtype."""
    checkpoint = resolve_checkpoint(source)
    placement = offline_placement(device, dtype)
    path = _report_path(checkpoint, prompt, settings or DetectionSettings(), eval_path, placement)
    report = _load_cached(path)
    return None if report is None else (checkpoint, report)


def detect(source: str | None = None, *, prompt: str = DEFAULT_PROMPT, settings: DetectionSettings | None = None,
           eval_path: Path | None = None, use_cache: bool = True, progress: bool = True, device: str = "auto",
           dtype: str = "auto") -> tuple[Checkpoint, SuperWeightReport]:
    """Resolve a model source and return its verified super-weight report (cached on disk by content).

    Args:
        source: None/"default", a published model's name, a .gguf file or a checkpoint directory
            (see resolve_checkpoint).
        prompt: the detection prompt.
        settings: detection thresholds.
        eval_path: evaluation text; the bundled Moby-Dick chapters by default.
        use_cache: reuse a report computed before for the same model, prompt, settings, text and placement.
        progress: progress bars on stderr.
        device, dtype: where the model is loaded for detection (offline_placement: "auto" is the GPU in bfloat16
            when there is one, else the CPU in float32).
    """
    settings = settings or DetectionSettings()
    placement = offline_placement(device, dtype)
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(source)
    prepared = time.perf_counter()
    cached = _report_path(checkpoint, prompt, settings, eval_path, placement)
    if use_cache and (report := _load_cached(cached)) is not None:
        return checkpoint, report
    model, tokenizer = load_model(checkpoint, device=placement[0], dtype=placement[1])
    loaded = time.perf_counter()
    load_memory = peak_memory_mib(next(model.parameters()).device)
    find_down_projections(model)  # fail on an unsupported structure before any work
    eval_text = load_eval_text(tokenizer, eval_path)
    report = find_super_weights(model, tokenizer, eval_text, prompt=prompt, settings=settings, progress=progress,
                                checkpoint=checkpoint)
    report = replace(report, timings={"prepare": round(prepared - start, 3), "load": round(loaded - prepared, 3),
                                      **report.timings, "memory_mib": {"load": load_memory,
                                                                       **report.timings["memory_mib"]}})
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, report.to_json())
    except OSError as e:  # a read-only or full cache: the report is still good, it is just not kept
        log.warning("could not cache the report in %s (%s): detection will run again next time", cached.parent,
                    e.strerror)
    return checkpoint, report
