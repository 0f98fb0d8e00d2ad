"""What having the A/B arms available costs base traffic on GPU, by how much of the model LoRA wraps.

vLLM's offline `LLM`, the default model in bfloat16, base requests only (no adapter), 128 greedy tokens each,
ignore_eos; 1, 32 and 256 requests at once. Configurations: LoRA off; LoRA on every module vLLM wraps by default;
LoRA on the down-projections only (what the server uses, `lora_target_modules=["down_proj"]`), in the order given,
in one process.

Device (after the pack's chunks, see BENCHMARKS.md; the GGUF converted by an earlier call: converting it in the
same process can hang the first engine start):
    source ~/gpu/env.sh && PYTHONPATH=.:$PYTHONPATH VLLM_WORKER_MULTIPROC_METHOD=spawn \
        python -m benchmarks.lora_scope down_proj all off --out $OUT
writes $OUT/lora_scope_<configs>.json; with it in benchmarks/gpu/, `python -m benchmarks.report` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.gpu_env import device_facts, place_default_model

BATCHES, TOKENS = (1, 32, 256), 128
CONFIGS = {"off": {"enable_lora": False},
           "all": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 4},
           "down_proj": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 4,
                         "lora_target_modules": ["down_proj"]}}


def measure(name: str, checkpoint: str) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=checkpoint, dtype="bfloat16", gpu_memory_utilization=0.4, seed=0, **CONFIGS[name])
    result = {"config": name, **device_facts(), "tokens": TOKENS,
              "startup_seconds": round(time.perf_counter() - t0, 1), "tok_s": {}}
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompt = "Write a short story about a lighthouse keeper."
    llm.generate([prompt] * 4, params, use_tqdm=False)  # warm-up
    for batch in BATCHES:
        t0 = time.perf_counter()
        outs = llm.generate([prompt] * batch, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result["tok_s"][str(batch)] = tokens / (time.perf_counter() - t0)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="+", choices=tuple(CONFIGS), help="configs, measured in this order")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    args = parser.parse_args()
    from superweights.compression.models import resolve_checkpoint

    place_default_model()
    checkpoint = str(resolve_checkpoint(None).path)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(n, checkpoint) for n in args.names]
    (args.out / f"lora_scope_{'_'.join(args.names)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
