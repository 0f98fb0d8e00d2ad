"""Perplexity and next-token measurements on an evaluation text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "moby_dick_ch1-3.txt"


class EvalTextError(UserError):
    """An evaluation text that cannot be used."""


@dataclass(frozen=True)
class EvalText:
    name: str
    sha256: str
    ids: torch.Tensor  # [N] token ids


def load_eval_text(tokenizer, path: Path | None = None, max_tokens: int | None = None) -> EvalText:
    """Tokenize an evaluation text (the bundled Moby-Dick chapters by default), optionally truncated."""
    import hashlib

    path = Path(path) if path else DEFAULT_EVAL_TEXT
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalTextError(f"cannot read evaluation text {path}: {e}") from e
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 16:
        raise EvalTextError(f"evaluation text {path} has only {ids.numel()} tokens; give at least a paragraph")
    return EvalText(name=path.name, sha256=hashlib.sha256(raw).hexdigest(), ids=ids)


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens.

    Args:
        model: a causal LM returning `.logits`.
        ids: [N] token ids; a trailing partial window is scored too.
    """
    device = next(model.parameters()).device
    windows = list(torch.split(ids, window))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        for length in sorted({w.numel() for w in chunk}):
            same = [w for w in chunk if w.numel() == length]
            if length < 2:
                continue
            x = torch.stack(same).to(device)  # [B, S]
            logits = model(input_ids=x).logits.float()  # [B, S, V]
            nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total_nll += float(nll)
            total_tokens += x[:, 1:].numel()
    return math.exp(min(total_nll / total_tokens, 700.0))  # a broken model stays finite
