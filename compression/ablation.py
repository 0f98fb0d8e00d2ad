"""Per-token loss of fixed evaluation windows with sets of down-projection weights removed, several sets per
forward pass.

A removal is not a weight edit but a forward hook on the down-projection, per batch element b:
    y[b, :, row] -= w * x[b, :, col]        # = the output of W with W[row, col] zeroed
so one batched forward scores several removal sets (each set has its own copies of the windows). Blocks before
the first layer any set touches compute what the intact model computes: they return the intact model's outputs,
recorded once on the baseline pass, instead of running again. A causal model computes the same on the first n
tokens of a window whatever follows them, so a scorer of those n tokens (`head`) takes its baseline from the
pass over the whole window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from .architectures import DownProjection


class Located(Protocol):
    """A down-projection weight: module name, position and the value it has in the intact model."""

    module: str
    layer: int
    row: int
    col: int
    value: float


Key = frozenset[tuple[str, int, int]]


def removal_key(weights: Sequence[Located]) -> Key:
    return frozenset((w.module, w.row, w.col) for w in weights)


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Within the block, each (module, hook) pair's forward hook is registered; removed even on error."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decoder_blocks(model: nn.Module, projections: list[DownProjection]) -> dict[int, nn.Module]:
    """Layer -> its decoder block (e.g. "model.layers.3"), found from the down-projections' names."""
    blocks: dict[int, nn.Module] = {}
    for p in projections:
        prefix = p.name[: p.name.index(f".{p.layer}.") + len(f".{p.layer}")]
        blocks.setdefault(p.layer, model.get_submodule(prefix))
    return blocks


def _removal_hook(entries: list[tuple[int, int, int, float]], device: torch.device):
    """Forward hook subtracting w * x[b, :, col] from y[b, :, row] for each (b, row, col, w)."""
    b, rows, cols, values = (torch.tensor(v, device=device) for v in zip(*entries))

    def hook(module, args, output):
        x = args[0]  # [B, S, in]
        delta = x[b, :, cols] * values.to(x.dtype)[:, None]  # [K, S]
        output.transpose(1, 2).index_put_((b, rows), -delta.to(output.dtype), accumulate=True)  # y: [B, S, out]
        return output
    return hook


@contextlib.contextmanager
def removals(projections: dict[str, DownProjection], sets: Sequence[Sequence[Located]],
             copies: int = 1) -> Iterator[None]:
    """Within the block, batch elements [j * copies, (j + 1) * copies) compute with sets[j]'s weights removed."""
    per_module: dict[str, list[tuple[int, int, int, float]]] = {}
    for j, weights in enumerate(sets):
        for w in weights:
            for i in range(copies):
                per_module.setdefault(w.module, []).append((j * copies + i, w.row, w.col, w.value))
    modules = {name: projections[name].module for name in per_module}
    device = next(iter(modules.values())).weight.device if modules else None
    with forward_hooks([(modules[name], _removal_hook(entries, device)) for name, entries in per_module.items()]):
        yield


@contextlib.contextmanager
def _replayed(blocks: dict[int, nn.Module], before: int, recorded: dict[int, object], copies: int) -> Iterator[None]:
    """Blocks below layer `before` return the recorded output of block `before - 1`, repeated `copies` times
    along the batch, instead of computing: the intact model's hidden states at the first block that runs."""
    skipped = [layer for layer in blocks if layer < before]
    if not skipped:
        yield
        return
    output = recorded[max(skipped)]
    if isinstance(output, tuple):
        replay = (output[0].repeat(copies, 1, 1),) + output[1:]
    else:
        replay = output.repeat(copies, 1, 1)
    own = {layer: blocks[layer].__dict__.get("forward") for layer in skipped}  # e.g. accelerate's dispatch hook
    try:
        for layer in skipped:
            blocks[layer].forward = lambda *args, **kwargs: replay
        yield
    finally:
        for layer, forward in own.items():
            if forward is None:
                del blocks[layer].forward
            else:
                blocks[layer].forward = forward


def _head_of(output, tokens: int):
    """Batch element 0's first `tokens` positions of a block's output (a tensor, or a tuple led by one)."""
    if isinstance(output, tuple):
        return (output[0][:1, :tokens].clone(),) + output[1:]
    return output[:1, :tokens].clone()


class AblationScorer:
    """Next-token losses on fixed windows: of the intact model, and with sets of weights removed (memoised).

    Args:
        model: a causal LM in eval mode; its weights are never changed.
        projections: its down-projections (find_down_projections).
        windows: [S] token ids each (see compression.evaluation.eval_windows); every position after the first is
            scored.
        reuse_prefix: keep every block's output on the windows (memory: layers x tokens x hidden) so that a removal
            set's forward starts at its first layer.
        max_batch_tokens: tokens per forward pass (removal sets x window tokens).
        head_tokens: also make `self.head`, a scorer of the first head_tokens tokens of the first window (with
            reuse_prefix), from this scorer's baseline pass.
    """

    def __init__(self, model: nn.Module, projections: list[DownProjection], windows: list[torch.Tensor],
                 reuse_prefix: bool = True, max_batch_tokens: int = 1024, head_tokens: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.by_name = {p.name: p for p in projections}
        self.blocks = decoder_blocks(model, projections)
        self.max_batch_tokens = max_batch_tokens
        self._memo: dict[Key, torch.Tensor] = {}
        self.forwards = 0
        lengths = sorted({w.numel() for w in windows if w.numel() >= 2})
        self.groups = [torch.stack([w for w in windows if w.numel() == n]).to(self.device) for n in lengths]  # [B, S]
        self.tokens = sum(g.shape[0] * (g.shape[1] - 1) for g in self.groups)
        self._recorded: list[dict[int, object]] = [{} for _ in self.groups]
        head: dict[int, object] = {}
        first = lengths.index(windows[0].numel()) if head_tokens else -1  # window 0's group; it is that group's row 0
        losses = []
        for g, ids in enumerate(self.groups):
            hooks = [(block, self._recorder(g, layer, reuse_prefix, head if g == first else None, head_tokens))
                     for layer, block in self.blocks.items() if reuse_prefix or g == first]
            with forward_hooks(hooks):
                losses.append(self._nll(ids))
        self.baseline = torch.cat(losses)  # [N] per-token NLL of the intact model
        if head_tokens:
            self.head = self._sharing(windows[0][:head_tokens], head,
                                      losses[first].view(self.groups[first].shape[0], -1)[0, : head_tokens - 1])

    def _recorder(self, g: int, layer: int, whole: bool, head: dict[int, object] | None, head_tokens: int):
        def hook(module, args, output):
            if whole:
                self._recorded[g][layer] = output
            if head is not None:
                head[layer] = _head_of(output, head_tokens)
        return hook

    def _sharing(self, ids: torch.Tensor, recorded: dict[int, object], baseline: torch.Tensor) -> AblationScorer:
        """A scorer of ids [S] (a window's first tokens) whose baseline pass was this scorer's."""
        scorer = object.__new__(AblationScorer)
        scorer.model, scorer.device, scorer.by_name, scorer.blocks = self.model, self.device, self.by_name, self.blocks
        scorer.max_batch_tokens, scorer._memo, scorer.forwards = self.max_batch_tokens, {}, 0
        scorer.groups = [ids[None].to(self.device)]
        scorer.tokens = ids.numel() - 1
        scorer._recorded = [recorded]
        scorer.baseline = baseline.clone()
        return scorer

    def _nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token NLL [B * (S - 1)] of ids [B, S], every position after the first."""
        self.forwards += 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [B, S-1, V]
            nll = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return nll.view(ids.shape[0], -1).flatten()

    def losses(self, sets: Sequence[Sequence[Located]]) -> list[torch.Tensor]:
        """Per-token NLL [N] with each set's weights removed (an empty set: the intact model)."""
        todo = {removal_key(s): s for s in sets if removal_key(s) not in self._memo and s}
        pending = sorted(todo.values(), key=lambda s: min(w.layer for w in s))  # similar start layers together
        for g, ids in enumerate(self.groups):
            per_forward = max(1, self.max_batch_tokens // ids.numel())
            for start in range(0, len(pending), per_forward):
                chunk = pending[start:start + per_forward]
                for s, nll in zip(chunk, self._removed(g, chunk)):
                    key = removal_key(s)
                    self._memo[key] = torch.cat([self._memo[key], nll]) if g else nll
        return [self._memo[removal_key(s)] if s else self.baseline for s in sets]

    def _removed(self, g: int, chunk: list[Sequence[Located]]) -> list[torch.Tensor]:
        ids = self.groups[g]  # [B, S]; set j occupies batch rows [j * B, (j + 1) * B)
        first = min(w.layer for weights in chunk for w in weights)
        recorded = self._recorded[g]
        replay = _replayed(self.blocks, first, recorded, len(chunk)) if recorded else contextlib.nullcontext()
        with removals(self.by_name, chunk, copies=ids.shape[0]), replay:
            nll = self._nll(ids.repeat(len(chunk), 1))
        return list(nll.view(len(chunk), -1))
