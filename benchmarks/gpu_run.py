"""The GPU half: our server and vLLM's OpenAI server on the lent H200, on the default model in bfloat16.

Device steps (BENCHMARKS.md's GPU section): carry vLLM over with scripts/gpu/pack.sh, then in one call each
    python -m benchmarks.gpu_run ours --out $OUT    # our server: functional checks, load levels, A/B cost
    python -m benchmarks.gpu_run vllm --out $OUT    # vLLM's OpenAI server, LoRA on and off
and here, with the fetched gpu_*.json in benchmarks/gpu/, `python -m benchmarks.report` rewrites BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from benchmarks.common import device_facts, place_default_model, prompts, serve_and_measure, server_spec

LEVELS, TOKENS = [1, 32, 256], 128


def functional_checks(port: int) -> dict:
    """Generate, GetSuperWeights, CompareGenerations; base arm == base alone; the removal arm loses Paris."""
    from superweights.server.client import SuperWeightClient

    with SuperWeightClient(f"127.0.0.1:{port}") as client:
        info = client.model_info()
        report = client.super_weights()
        alone = client.generate("The capital of France is", max_tokens=8, temperature=0.0)
        compare = client.compare("The capital of France is", max_tokens=8, temperature=0.0)
        arms = {a.variant: a for a in compare.arms}
        return {"engine": info.engine, "device": info.device, "dtype": info.dtype, "variants": list(info.variants),
                "super_weights": [(w.layer, w.row, w.col, w.value) for w in report.super_weights],
                "generate_text": alone["text"], "base_arm_text": arms["base"].text,
                "no_super_weights_text": arms["no_super_weights"].text,
                "base_arm_equals_base_alone": list(arms["base"].token_ids) == alone["token_ids"],
                "base_keeps_paris": "Paris" in arms["base"].text,
                "removal_loses_paris": "Paris" not in arms["no_super_weights"].text,
                "stop_word_mass": {a.variant: a.stop_word_mass for a in compare.arms}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("ours", "vllm"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    place_default_model()
    from superweights.compression.models import load_model
    from superweights.compression.pipeline import detect

    t0 = time.perf_counter()
    checkpoint, _ = detect(None, progress=False)
    detect_seconds = time.perf_counter() - t0
    _, tokenizer = load_model(checkpoint)
    prompt_set = prompts(tokenizer)
    from vllm.engine.arg_utils import AsyncEngineArgs

    target_modules = "lora_target_modules" in AsyncEngineArgs.__dataclass_fields__
    names = ["ours"] if args.what == "ours" else ["vllm-openai", "vllm-openai-nolora"]
    results = {**device_facts(), "detect_seconds": detect_seconds, "levels": LEVELS, "tokens": TOKENS,
               "lora_target_modules": target_modules, "servers": []}
    for name in names:
        spec = server_spec(Path(checkpoint.path), name, dtype="bfloat16", target_modules=target_modules)
        results["servers"].append(asyncio.run(serve_and_measure(
            spec, prompt_set, LEVELS, TOKENS, args.out, ready_timeout=900,
            checks=functional_checks if name == "ours" else None, ab=name == "ours")))
    (args.out / f"gpu_{args.what}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
