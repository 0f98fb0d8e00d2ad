"""Perplexity, next-token accuracy and stop-word mass on an evaluation text.

Windows follow the model's BOS convention (lm-eval's rolling windows): where the tokenizer starts every sequence
with a BOS token, each window is [BOS] + (window - 1) text tokens and every text token is scored; otherwise each
window is `window` text tokens and its first token is context only. A model that always saw BOS first is
handicapped without it (one GGUF here: perplexity 74 with BOS, 156 without).
"""

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
        tokenize: text -> token ids, without special tokens (with them, a tokenizer that adds BOS makes every
            word two tokens and the set comes out empty).
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


def bos_token_id(tokenizer) -> int | None:
    """The BOS token id when the tokenizer starts every sequence with it (Llama, Mistral, Gemma), else None
    (SmolLM2, Qwen2, GPT-2: they name a BOS token but do not add it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def eval_windows(ids: torch.Tensor, window: int, bos_id: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of at most `window` tokens over `ids` [N]: [BOS] + (window - 1) text tokens each
    when bos_id is given, else `window` text tokens each; a trailing partial window is kept."""
    if bos_id is None:
        return list(torch.split(ids, window))
    bos = ids.new_tensor([bos_id])
    return [torch.cat([bos, chunk]) for chunk in torch.split(ids, window - 1)]


@dataclass(frozen=True)
class EvalText:
    name: str
    sha256: str
    ids: torch.Tensor  # [N] text token ids, without special tokens
    bos_id: int | None = None  # prepended to every window when the tokenizer adds BOS (see bos_token_id)


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
    return EvalText(name=path.name, sha256=hashlib.sha256(raw).hexdigest(), ids=ids, bos_id=bos_token_id(tokenizer))


@dataclass(frozen=True)
class Quality:
    perplexity: float
    next_token_accuracy: float  # argmax prediction equals the next token
    stop_word_mass: float  # mean probability on stop words; 0.0 when no stop-word ids were given
    tokens: int  # scored positions


@torch.inference_mode()
def evaluate(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 8,
             stop_ids: frozenset[int] = frozenset(), bos_id: int | None = None) -> Quality:
    """Next-token quality over non-overlapping windows of `window` tokens (see eval_windows).

    Args:
        model: a causal LM returning `.logits`.
        ids: [N] text token ids; a trailing partial window is scored too.
        stop_ids: token ids whose probability mass is summed (see stop_word_ids).
        bos_id: the BOS token that starts every window, for a tokenizer that adds one (EvalText.bos_id).
    """
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    windows = eval_windows(ids, window, bos_id)
    total_nll = total_correct = total_stop = 0.0
    total_tokens = 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        for length in sorted({w.numel() for w in chunk}):
            same = [w for w in chunk if w.numel() == length]
            if length < 2:
                continue
            x = torch.stack(same).to(device)  # [B, S]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float().flatten(0, 1)  # [B*(S-1), V]
            target = x[:, 1:].flatten()
            total_nll += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            total_correct += float((logits.argmax(-1) == target).sum())
            if stop.numel():
                total_stop += float(logits.softmax(-1).index_select(-1, stop).sum())
            total_tokens += target.numel()
    return Quality(perplexity=math.exp(min(total_nll / total_tokens, 700.0)),  # a broken model stays finite
                   next_token_accuracy=total_correct / total_tokens, stop_word_mass=total_stop / total_tokens,
                   tokens=total_tokens)


def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, batch_size: int = 8,
               bos_id: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens (see evaluate)."""
    return evaluate(model, ids, window, batch_size, bos_id=bos_id).perplexity
