"""A live A/B of one prompt through several variants of the served model, measured: no gRPC here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .engine import MAX_LOGPROBS, Sampling, SuperWeightEngine, TokenChoice
from .quality import DivergenceResult, divergence, stop_word_mass, topk
from .variants import Variant


@dataclass(frozen=True)
class Arm:
    variant: Variant
    text: str
    token_ids: list[int]
    tokens: list[TokenChoice]
    finish_reason: str
    prompt_tokens: int
    stop_word_mass: float = 0.0


@dataclass(frozen=True)
class CompareResult:
    arms: list[Arm]  # the first is the reference
    divergences: list[tuple[Variant, DivergenceResult]]  # every arm after the first, against the first


async def _run_arm(engine: SuperWeightEngine, ids: list[int], sampling: Sampling, variant: Variant) -> Arm:
    text, token_ids, tokens, finish = [], [], [], ""
    async for chunk in engine.generate(ids, sampling, variant):
        text.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        tokens.extend(chunk.tokens)
        finish = chunk.finish_reason or finish
    return Arm(variant, "".join(text), token_ids, tokens, finish, len(ids))


async def compare(engine: SuperWeightEngine, ids: list[int], sampling: Sampling, variants: list[Variant],
                  stop_ids: frozenset[int]) -> CompareResult:
    """Generate with every variant in one batch, then score each later arm on the first arm's continuation.

    Stop-word mass and divergence are measured on one shared context, the first arm's continuation: its own
    top-k for the first arm, teacher-forced top-k for the others, so every arm is judged on the same text.
    """
    sampling = Sampling(**{**sampling.__dict__, "logprobs": max(sampling.logprobs, MAX_LOGPROBS)})
    arms = await _together(_run_arm(engine, ids, sampling, v) for v in variants)
    reference = arms[0]
    forced = await _together(engine.forced_topk(ids, reference.token_ids, v, MAX_LOGPROBS) for v in variants[1:])
    contexts = [[topk(t) for t in reference.tokens]] + list(forced)
    measured = [Arm(**{**arm.__dict__, "stop_word_mass": stop_word_mass(context, stop_ids)})
                for arm, context in zip(arms, contexts)]
    divergences = [(arm.variant, divergence(reference.tokens, f, reference.token_ids, arm.token_ids))
                   for arm, f in zip(arms[1:], forced)]
    return CompareResult(measured, divergences)


async def _together(coroutines) -> list:
    """Every result, in order; if one fails (or the caller is cancelled), the others are cancelled and awaited
    before the error goes on (their engine requests aborted), so no arm runs on after its call has ended."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
