"""What having the A/B arms costs base traffic at 8B (issue 13, item 3), in one device call.

vLLM's offline `LLM` on the 8B-shaped model (benchmarks.model_8b), bf16, dummy weights, the engine options of
benchmarks.gpu_8b (our server's, scheduler written out); 128 greedy tokens per request, ignore_eos. Configurations,
each in a child process of its own so its GPU memory is released before the next:
    down_proj  LoRA on the down-projections only (what our server does), rank 8, 4 adapters a batch
    off        LoRA off
    all        LoRA on every module vLLM wraps (its default reach), rank 8
Workloads: base requests only at 1 / 32 / 256 at once; and, with LoRA on, 10% of each batch of 32 / 256 on the
removal arm (a rank-3 adapter removing the three declared super weights, their values probed from the engine),
after one untimed mixed batch of each size. The first run of 2026-12-01 had none, and its first mixed level (32)
came out at 0.61x; with the warm-up (3.6 s for batches that take 2.4 s warm: the adapter's first load and the LoRA
kernels' first compile) the same level is 0.96x.

    python -m benchmarks.gpu_8b_lora run --out $OUT      # device; writes $OUT/gpu8b_lora.json after each config
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_8b import (
    Budget,
    Model,
    add_model_options,
    add_run_options,
    arm_env,
    device_facts,
    engine_options,
    model_args,
    model_from,
    model_prompts,
    offline_level,
    run_child,
    run_in_turn,
    write_child_result,
)

CONFIGS = ("down_proj", "off", "all")  # down_proj first: its compiled graphs are those of gpu_8b's arms
BATCHES, MIX_BATCHES, MIX, ROUNDS, TOKENS = (1, 32, 256), (32, 256), 0.1, 3, 128


def config_options(model: Model, name: str) -> dict:
    """gpu_8b's engine options with LoRA as `name` says; the probe extension to read the served super weights."""
    from superweights.server.engine import PROBE_EXTENSION

    options = engine_options(model, lora=name != "off")
    if name == "all":
        options.pop("lora_target_modules", None)
    return {**options, "worker_extension_cls": PROBE_EXTENSION}


def removal_adapter(llm, model: Model, directory: Path):
    """A LoRARequest that removes every declared super weight, with the values the engine computes with."""
    from vllm.lora.request import LoRARequest

    from superweights.compression.adapters import write_adapter
    from superweights.compression.vllm_plugin import combine_probe_values

    report = model.report()
    entries = [(w.module, w.row, w.col) for w in report.super_weights]
    values = combine_probe_values(llm.collective_rpc("probe_super_weights", args=(entries,)))
    for w, value in zip(report.super_weights, values):
        w.value = value
    path = write_adapter(report, directory / "no_super_weights", alpha=0.0, base_model=str(model.path))
    return LoRARequest(lora_name="no_super_weights", lora_int_id=1, lora_path=str(path)), values


def measure_config(model: Model, name: str, batches=BATCHES, mix_batches=MIX_BATCHES, tokens: int = TOKENS) -> dict:
    """One configuration: base-only levels, then (LoRA on) the same batches with 10% on the removal arm."""
    from vllm import LLM, SamplingParams

    options = config_options(model, name)
    t0 = time.perf_counter()
    llm = LLM(model=str(model.path), disable_log_stats=False, **options)
    result = {"config": name, "engine_options": options, "startup_seconds": time.perf_counter() - t0,
              "base": [], "mixed": []}
    prompt_set = model_prompts(model)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompt_set[:4]], params, use_tqdm=False)  # warm-up
    for n in batches:
        result["base"].append(offline_level(llm, params, prompt_set, n, ROUNDS))
    if name == "off":
        return result
    with tempfile.TemporaryDirectory(prefix="gpu8b-lora-") as tmp:
        removal, result["probed_values"] = removal_adapter(llm, model, Path(tmp))
        removals = {n: max(1, math.ceil(MIX * n)) for n in mix_batches}  # the first k of each batch take the arm
        loras = {n: [removal] * k + [None] * (n - k) for n, k in removals.items()}
        t0 = time.perf_counter()
        for n, lora in loras.items():  # warm-up, untimed: the adapter's first load, the LoRA kernels' first compile
            offline_level(llm, params, prompt_set, n, 1, lora=lora)
        result["mixed_warmup_seconds"] = time.perf_counter() - t0
        for n, lora in loras.items():
            level = offline_level(llm, params, prompt_set, n, ROUNDS, lora=lora)
            result["mixed"].append({**level, "removal_requests": removals[n]})
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    from benchmarks.gpu_env import register_plugin

    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    path = args.out / "gpu8b_lora.json"
    results = {**device_facts(), "plugin": register_plugin(), "env": arm_env(), "super_weights": model.declared,
               "tokens": args.tokens, "rounds": ROUNDS, "mix": MIX, "configs": []}

    def measure(name: str, entry: dict, saved) -> None:
        entry.update(run_child(["config", name, *model_args(model), "--tokens", str(args.tokens)],
                               timeout=max(budget.left(), 1), module="benchmarks.gpu_8b_lora",
                               log=log_dir / f"lora-{name}.log"))

    run_in_turn(args.configs, "config", results, results["configs"], path, budget, measure)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("run", help="every configuration, one child process each (the device call)")
    add_run_options(p)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    c = sub.add_parser("config", help="(child) one configuration")
    c.add_argument("name", choices=CONFIGS)
    add_model_options(c)
    c.add_argument("--tokens", type=int, default=TOKENS)
    c.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    c.add_argument("--mix-batches", nargs="+", type=int, default=list(MIX_BATCHES))
    c.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    model = model_from(args)
    if args.what == "run":
        run(model, args)
        return
    write_child_result(args.result, lambda: measure_config(model, args.name, tuple(args.batches),
                                                           tuple(args.mix_batches), args.tokens))


if __name__ == "__main__":
    main()
