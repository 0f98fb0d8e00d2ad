"""Perplexity, next-token accuracy and stop-word mass on an evaluation text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "moby_dick_ch1-3.txt"
# The paper's observation: without its super weight a model moves probability mass to stop words.
STOP_WORDS = ("the", "The", ".", ",", "and", "of", "a", "to", "in", "is", "that", "it", "\n", ";", ":")


def stop_word_ids(tokenize) -> frozenset[int]:
    """Token ids of stop words that are single tokens, with and without a leading space.

    Args:
        tokenize: text -> token ids, without special tokens.
    """
    ids = set()
    for word in STOP_WORDS:
        for form in (word, " " + word):
            encoded = tokenize(form)
            if len(encoded) == 1:
                ids.add(encoded[0])
    return frozenset(ids)


class EvalTextError(UserError):
    """An evaluation text that cannot be used."""


@dataclass(frozen=True)
class EvalText:
    name: str
    sha256: str
    ids: torch.Tensor  # [N] token ids


def load_eval_text(tokenizer, path: Path | None = None) -> EvalText:
    """Tokenize an evaluation text (the bundled Moby-Dick chapters by default)."""
    import hashlib

    path = Path(path) if path else DEFAULT_EVAL_TEXT
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalTextError(f"cannot read evaluation text {path}: {e}") from e
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 16:
        raise EvalTextError(f"evaluation text {path} has only {ids.numel()} tokens; give at least a paragraph")
    return EvalText(name=path.name, sha256=hashlib.sha256(raw).hexdigest(), ids=ids)


@dataclass(frozen=True)
class Quality:
    perplexity: float
    next_token_accuracy: float  # argmax prediction equals the next token
    stop_word_mass: float  # mean probability on stop words; 0.0 when no stop-word ids were given
    tokens: int  # scored positions


@torch.inference_mode()
def evaluate(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 8,
             stop_ids: frozenset[int] = frozenset()) -> Quality:
    """Next-token quality over non-overlapping windows of `window` tokens.

    Args:
        model: a causal LM returning `.logits`.
        ids: [N] token ids; a trailing partial window is scored too.
        stop_ids: token ids whose probability mass is summed (see stop_word_ids).
    """
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    windows = list(torch.split(ids, window))
    total_nll = total_correct = total_stop = 0.0
    total_tokens = 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        for length in sorted({w.numel() for w in chunk}):
            same = [w for w in chunk if w.numel() == length]
            if length < 2:
                continue
            x = torch.stack(same).to(device)  # [B, S]
            logits = model(input_ids=x).logits[:, :-1].float().flatten(0, 1)  # [B*(S-1), V]
            target = x[:, 1:].flatten()
            total_nll += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            total_correct += float((logits.argmax(-1) == target).sum())
            if stop.numel():
                total_stop += float(logits.softmax(-1).index_select(-1, stop).sum())
            total_tokens += target.numel()
    return Quality(perplexity=math.exp(min(total_nll / total_tokens, 700.0)),  # a broken model stays finite
                   next_token_accuracy=total_correct / total_tokens, stop_word_mass=total_stop / total_tokens,
                   tokens=total_tokens)


def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens (see evaluate)."""
    return evaluate(model, ids, window, batch_size).perplexity
