"""What a running server of ours answers, kept with the numbers measured on it: the served super weights, the base
arm against the base model run alone, and (on real weights) whether removing the super weights loses the answer."""

from __future__ import annotations

GOLDEN_PROMPT = "The capital of France is"
CHECK_TOKENS = 8


def functional_checks(port: int) -> dict:
    """Generate, GetSuperWeights, CompareGenerations on a real model: base arm == base alone; the removal arm loses
    Paris."""
    from superweights.server.client import SuperWeightClient

    with SuperWeightClient(f"127.0.0.1:{port}") as client:
        info = client.model_info()
        report = client.super_weights()
        alone = client.generate(GOLDEN_PROMPT, max_tokens=CHECK_TOKENS, temperature=0.0)
        compare = client.compare(GOLDEN_PROMPT, max_tokens=CHECK_TOKENS, temperature=0.0)
        arms = {a.variant: a for a in compare.arms}
        return {"engine": info.engine, "device": info.device, "dtype": info.dtype, "variants": list(info.variants),
                "super_weights": [(w.layer, w.row, w.col, w.value) for w in report.super_weights],
                "generate_text": alone["text"], "base_arm_text": arms["base"].text,
                "no_super_weights_text": arms["no_super_weights"].text,
                "base_arm_equals_base_alone": list(arms["base"].token_ids) == alone["token_ids"],
                "base_keeps_paris": "Paris" in arms["base"].text,
                "removal_loses_paris": "Paris" not in arms["no_super_weights"].text,
                "stop_word_mass": {a.variant: a.stop_word_mass for a in compare.arms}}


def served_checks(port: int, prompt_ids: list[int]) -> dict:
    """On any weights (dummy ones too): the super weights as the engine computes with them, the base arm against
    base alone, and the removal arm differing from base."""
    from superweights.server.client import SuperWeightClient

    with SuperWeightClient(f"127.0.0.1:{port}") as client:
        report = client.super_weights()
        alone = client.generate(prompt_ids, max_tokens=CHECK_TOKENS, temperature=0.0)
        compare = client.compare(prompt_ids, max_tokens=CHECK_TOKENS, temperature=0.0)
        arms = {a.variant: list(a.token_ids) for a in compare.arms}
        return {"variants": list(client.model_info().variants),
                "super_weights": [(w.layer, w.row, w.col, w.engine_value) for w in report.super_weights],
                "base_arm_equals_base_alone": arms.get("base") == alone["token_ids"],
                "removal_arm_differs": arms.get("no_super_weights") != arms.get("base")}
