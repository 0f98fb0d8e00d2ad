"""What having the A/B arms available costs base traffic on GPU, by how much of the model LoRA wraps.

vLLM's offline `LLM`, the default model in bfloat16, base requests only (no adapter), 128 greedy tokens each,
ignore_eos; 1, 32 and 256 requests at once. Configurations: LoRA off; LoRA on every module vLLM wraps by default;
LoRA on the down-projections only (what the server uses, `lora_target_modules=["down_proj"]`).

Device (after the pack's chunks, see BENCHMARKS.md; the GGUF converted by an earlier call, since converting it in
the same process hung the first engine start there):
    source ~/gpu/env.sh && PYTHONPATH=.:$PYTHONPATH VLLM_WORKER_MULTIPROC_METHOD=spawn \
        python -m benchmarks.gpu_lora_scope down_proj all off --out $OUT
Here, with the fetched lora_scope_*.json in benchmarks/gpu/: `python -m benchmarks.gpu_lora_scope report` rewrites
BENCHMARKS.md from every saved result (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BATCHES, TOKENS = (1, 32, 256), 128
CONFIGS = {"off": {"enable_lora": False},
           "all": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 4},
           "down_proj": {"enable_lora": True, "max_lora_rank": 8, "max_loras": 4,
                         "lora_target_modules": ["down_proj"]}}


def measure(name: str, checkpoint: str) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=checkpoint, dtype="bfloat16", gpu_memory_utilization=0.4, seed=0, **CONFIGS[name])
    result = {"config": name, "startup_seconds": round(time.perf_counter() - t0, 1), "tok_s": {}}
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


def load_lora_scope_runs(directory: Path) -> list[dict]:
    return [r for p in sorted(directory.glob("lora_scope_*.json")) for r in json.loads(p.read_text())]


def lora_scope_lines(results: list[dict]) -> list[str]:
    """BENCHMARKS.md's LoRA-reach table (benchmarks/report.py puts it there)."""
    if not results:
        return []
    by = {r["config"]: r for r in results}
    off = by["off"]["tok_s"]
    lines = ["", "### What LoRA's reach costs base traffic (H200)", "",
             "vLLM 0.26.0's offline `LLM`, the default model in bfloat16, base requests only (no adapter), 128 greedy "
             "tokens each (`benchmarks/gpu_lora_scope.py`). The server wraps only the down-projections, where the "
             "super weights live; this asks whether that saves anything against vLLM's default of "
             "wrapping every module it can.", "",
             "| LoRA | tok/s at 1 | 32 | 256 | vs off (1 / 32 / 256) |", "| --- | ---: | ---: | ---: | --- |"]
    labels = {"off": "off", "all": "on, every module (vLLM's default)", "down_proj": "on, down_proj only (ours)"}
    for name in ("off", "all", "down_proj"):
        t = by[name]["tok_s"]
        ratio = " / ".join(f"{t[k] / off[k]:.2f}" for k in ("1", "32", "256"))
        lines.append(f"| {labels[name]} | {t['1']:,.0f} | {t['32']:,.0f} | {t['256']:,.0f} | {ratio} |")
    lines += ["", "Measured 2026-11-29, once, in one process in the order down_proj, all, off "
              "(`VLLM_WORKER_MULTIPROC_METHOD=spawn`; a first attempt that converted the GGUF in the same process "
              "hung at engine start). The restriction to down_proj did not lower the cost in this run: it came out "
              "slower than wrapping every module at 1 and 32 streams. It ran first in its process; an order effect "
              "was not ruled out (device time ran out), so read this as: no saving shown, not as a measured loss. "
              "The first session's measurement of LoRA on every module (shared notes: 451 / 8,633 / 27,107 tok/s) "
              "differs from this run's by up to 40%, which is the noise level of these figures."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="+", help="configs (off, all, down_proj), or: report")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    args = parser.parse_args()
    if args.names[0] == "report":
        from benchmarks.report import load_gpu_runs, write_gpu_section

        write_gpu_section(load_gpu_runs(Path("benchmarks/gpu")), Path("BENCHMARKS.md"))
        return
    from benchmarks.gpu_run import place_default_model
    from compression.models import resolve_checkpoint

    place_default_model()
    checkpoint = str(resolve_checkpoint(None).path)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(n, checkpoint) for n in args.names]
    (args.out / f"lora_scope_{'_'.join(args.names)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
