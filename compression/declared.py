"""Super weights declared by the user (`--super-weights L:ROW:COL,...`) instead of detected.

For a model whose coordinates are published (compression/published.py) and trusted, or for an engine loaded with
vLLM's `--load-format dummy`, whose random weights hold no super weights to find. Nothing is verified: the report
says so, and the server takes each value from its checkpoint or, with no weights on disk, from the running engine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import replace
from pathlib import Path

from .architectures import DownProjection, find_down_projections
from .models import Checkpoint, ModelSourceError
from .published import Coordinate, check_fits
from .report import DeclaredSettings, EvalFacts, ModelFacts, SuperWeight, SuperWeightReport

UNKNOWN = math.nan  # a value the checkpoint does not hold (dummy weights): the engine's probe fills it in


def config_only_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory that may lack weights (vLLM's dummy load format reads only its config)."""
    path = Path(path).expanduser().resolve()
    config = path / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"not a model: {path} has no config.json (expected a Hugging Face checkpoint)")
    return Checkpoint(path=path, name=path.name, source=str(path),
                      sha256=hashlib.sha256(config.read_bytes()).hexdigest())


def _structure(checkpoint: Checkpoint) -> tuple[dict[int, DownProjection], ModelFacts]:
    """(down projections by layer, model facts) from the config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .detect import model_facts

    config = AutoConfig.from_pretrained(checkpoint.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    projections = find_down_projections(model)
    return {p.layer: p for p in projections}, replace(model_facts(model, projections, checkpoint), declared=True)


def _stored_values(path: Path, weights: list[SuperWeight], transposed: dict[str, bool]) -> list[float]:
    """Each weight's value read from the checkpoint's safetensors (only the one element); UNKNOWN without them."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            where.update({key: file for key in f.keys()})
    values = []
    for w in weights:
        file = where.get(w.parameter)
        if file is None:
            values.append(UNKNOWN)
            continue
        with safe_open(file, framework="pt") as f:
            tensor = f.get_slice(w.parameter)
            r, c = (w.col, w.row) if transposed[w.module] else (w.row, w.col)
            values.append(float(tensor[r:r + 1, c:c + 1].float().item()))
    return values


def declared_report(checkpoint: Checkpoint, coordinates: list[Coordinate]) -> SuperWeightReport:
    """A report that holds the declared super weights, unverified, with the values stored in the checkpoint."""
    projections, facts = _structure(checkpoint)
    check_fits(coordinates, facts.num_layers, facts.hidden_size, facts.intermediate_size)
    weights = [SuperWeight(layer=c.layer, module=projections[c.layer].name, row=c.row, col=c.col, value=UNKNOWN,
                           input_magnitude=0.0, output_magnitude=0.0) for c in coordinates]
    transposed = {p.name: p.transposed for p in projections.values()}
    report = SuperWeightReport(
        model=facts, prompt="", created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        evaluation=EvalFacts.unmeasured(), super_weights=weights, rejected_candidates=[], super_activations=[],
        layer_stats=[], settings=DeclaredSettings([str(c) for c in coordinates]))
    return report.with_values(_stored_values(checkpoint.path, weights, transposed))
