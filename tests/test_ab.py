"""server.ab.compare on its own: no gRPC, an engine stand-in that answers like vLLM with fixed distributions."""

import asyncio
import math

from superweights.server.ab import compare
from superweights.server.engine import Chunk, Sampling, TokenChoice
from superweights.server.variants import Variant

STOP = frozenset({0})  # token 0 is a stop word


class ScriptedEngine:
    """Variant "base" always puts 0.9 on token 1; variant "broken" puts 0.9 on the stop word 0."""

    def _dist(self, variant: Variant) -> dict[int, float]:
        top = 1 if variant.name == "base" else 0
        return {top: math.log(0.9), 2: math.log(0.1)}

    async def generate(self, ids, sampling, variant):
        dist = self._dist(variant)
        for i in range(sampling.max_tokens):
            token = max(dist, key=dist.get)
            choice = TokenChoice(token, str(token), dist[token], tuple((t, str(t), lp) for t, lp in dist.items()))
            yield Chunk(str(token), (token,), (choice,), "length" if i == sampling.max_tokens - 1 else None)

    async def forced_topk(self, prompt_ids, continuation, variant, k):
        return [self._dist(variant) for _ in continuation]


def test_compare_measures_every_arm_on_the_first_arms_continuation():
    base, broken = Variant("base", "base"), Variant("no_super_weights", "removed")
    result = asyncio.run(compare(ScriptedEngine(), [5, 6], Sampling(max_tokens=4), [base, broken], STOP))
    assert [a.variant.name for a in result.arms] == ["base", "no_super_weights"]
    assert result.arms[0].token_ids == [1, 1, 1, 1] and result.arms[1].token_ids == [0, 0, 0, 0]
    assert result.arms[0].stop_word_mass == 0.0
    assert abs(result.arms[1].stop_word_mass - 0.9) < 1e-9  # its own distribution on base's text
    (variant, d), = result.divergences
    assert variant is broken and d.first_differing_token == 0 and d.top1_agreement == 0.0
    expected_kl = 0.9 * (math.log(0.9) - math.log(0.1)) + 0.1 * (math.log(0.1) - math.log(0.1))
    assert abs(d.mean_kl_topk - expected_kl) < 1e-9
    assert all(len(a.tokens) == 4 for a in result.arms)  # logprobs raised to the top-k that the measures need


def test_an_arm_that_fails_stops_the_others():
    """One arm's error ends the compare with that error (the servicer maps it), and the other arms are cancelled,
    not left generating in the engine after their call has ended."""
    from superweights.server.variants import UnknownVariantError

    cancelled = []

    class FailingEngine(ScriptedEngine):
        async def generate(self, ids, sampling, variant):
            if variant.name == "gone":
                raise UnknownVariantError("gone", ["base"])
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(variant.name)
                raise
            yield  # an async generator, as the engine's

    variants = [Variant("base", "base", None), Variant("gone", "scaled", None, 1.5)]

    async def scenario():
        try:
            await asyncio.wait_for(compare(FailingEngine(), [1], Sampling(max_tokens=2), variants, STOP), 10)
        except UnknownVariantError as e:
            return e

    assert isinstance(asyncio.run(scenario()), UnknownVariantError)
    assert cancelled == ["base"]

