"""Output-quality measures: stop-word mass, A/B divergence, and the background perplexity canary."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from .engine import TokenChoice

log = logging.getLogger(__name__)


def topk(choice: TokenChoice) -> dict[int, float]:
    """A generated token's top-k alternatives as {token_id: logprob}."""
    return {tid: lp for tid, _, lp in choice.top}


def stop_word_mass(positions: list[dict[int, float]], stop_ids: frozenset[int]) -> float:
    """Mean over positions of the probability on stop words among each position's top-k {token_id: logprob}."""
    if not positions:
        return 0.0
    per_position = [sum(math.exp(lp) for tid, lp in p.items() if tid in stop_ids) for p in positions]
    return sum(per_position) / len(per_position)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token; -1 when equal (a shorter sequence differs where it ends)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return -1 if len(a) == len(b) else min(len(a), len(b))


def kl_topk(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p || q) over p's top-k (logprobs); a token missing from q's top-k gets q's smallest top-k logprob,
    an upper bound on its true probability, so this under- rather than over-states the divergence."""
    floor = min(q.values())
    return sum(math.exp(lp) * (lp - q.get(tid, floor)) for tid, lp in p.items())


@dataclass(frozen=True)
class DivergenceResult:
    first_differing_token: int
    top1_agreement: float
    mean_kl_topk: float


def divergence(reference: list[TokenChoice], forced: list[dict[int, float]], ref_ids: list[int],
               arm_ids: list[int]) -> DivergenceResult:
    """Compare an arm with the reference arm. Top-1 agreement and KL average over every position of the
    reference continuation (the arm teacher-forced on it), so they are defined past the first difference too.

    Args:
        reference: the reference arm's generated tokens with their top-k.
        forced: the arm's top-k logprobs at each position of the reference continuation (teacher forcing).
        ref_ids, arm_ids: the two free-running generations.
    """
    n = min(len(reference), len(forced))
    if n == 0:
        return DivergenceResult(first_difference(ref_ids, arm_ids), 1.0, 0.0)
    agree = kls = 0.0
    for ref, q in zip(reference[:n], forced[:n]):
        p = topk(ref)
        agree += max(p, key=p.get) == max(q, key=q.get)
        kls += kl_topk(p, q)
    return DivergenceResult(first_difference(ref_ids, arm_ids), agree / n, kls / n)


class Canary:
    """Every `interval` seconds, the perplexity of a fixed probe text per fixed variant, through the engine, and
    the super weights as the engine computes with them.

    It runs as ordinary engine requests beside live traffic, so it never blocks serving; its results go to
    `superweights_canary_perplexity{variant}`.
    """

    def __init__(self, engine, metrics, probe_ids: list[int], interval: float = 60.0, window: int = 512,
                 bos_id: int | None = None):
        self.engine, self.metrics, self.probe_ids = engine, metrics, probe_ids
        self.interval, self.window, self.bos_id = interval, window, bos_id
        self._task: asyncio.Task | None = None

    async def measure(self) -> dict[str, float]:
        variants = list(self.engine.variants.fixed.values())
        values = await asyncio.gather(*(self.engine.perplexity(self.probe_ids, v, self.window, self.bos_id)
                                        for v in variants))
        if self.engine.report.super_weights:  # what the engine computes with, again: a reload or kernel shows
            self.metrics.observe_served(self.engine.report.super_weights, await self.engine.served_super_weights(),
                                        self.engine.report.model.protected)
        measured = {v.name: value for v, value in zip(variants, values)}
        for name, value in measured.items():
            self.metrics.canary_perplexity.labels(name).set(value)
        self.metrics.canary_last_run.set(time.time())
        self.metrics.canary_runs.labels("ok").inc()
        return measured

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.measure()
            except asyncio.CancelledError:
                raise
            except Exception:  # the canary must never take the server down; it is counted and logged
                self.metrics.canary_runs.labels("error").inc()
                log.exception("canary measurement failed")

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="superweights-canary")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
