"""What having the A/B arms costs base traffic, on vLLM's offline `LLM` with LoRA off, on the down-projections only
(what our server does) and on every module vLLM wraps (its default reach).

The model is the 8B-shaped one on dummy weights (benchmarks.model_8b) with the engine options of
benchmarks.served_model (our server's, scheduler written out), LoRA rank 8, 4 adapters a batch; 128 greedy tokens
per request. Each configuration runs in a child process of its own, so its GPU memory is released before the next:
base requests only at 1 / 32 / 256 at once; then, with LoRA on, 10% of each batch of 32 / 256 on the removal arm
(a rank-3 adapter removing the three declared super weights, their values probed from the engine), after one
untimed mixed batch of each size (the adapter's first load and the LoRA kernels' first compile).

    bash benchmarks/on_gpu.sh lora_cost --budget-s 440    # device call; writes $OUT/gpu8b_lora.json after each
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmarks.device_call import DeviceCall, child_parser, device_parser, dispatch
from benchmarks.offline_engine import OfflineEngine
from benchmarks.served_model import Model, engine_options, model_args

CONFIGS = ("down_proj", "off", "all")  # down_proj first: its compiled graphs are those of the serving arms
BATCHES, MIX_BATCHES, MIX, ROUNDS = (1, 32, 256), (32, 256), 0.1, 3
RESULT = "gpu8b_lora.json"


def config_options(model: Model, name: str) -> dict:
    """Our server's engine options with LoRA as `name` says; the probe extension to read the served super weights."""
    from superweights.server.engine import PROBE_EXTENSION

    options = engine_options(model, lora=name != "off")
    if name == "all":
        options.pop("lora_target_modules", None)
    return {**options, "worker_extension_cls": PROBE_EXTENSION}


def removal_adapter(engine: OfflineEngine, model: Model, directory: Path):
    """A LoRARequest that removes every declared super weight, with the values the engine computes with."""
    from vllm.lora.request import LoRARequest

    from superweights.compression.adapters import write_adapter

    report = model.report()
    values = engine.probe(report)
    path = write_adapter(report.with_values(values), directory / "no_super_weights", alpha=0.0,
                         base_model=str(model.path))
    return LoRARequest(lora_name="no_super_weights", lora_int_id=1, lora_path=str(path)), values


def measure_config(model: Model, name: str, batches=BATCHES, mix_batches=MIX_BATCHES, tokens: int = 128) -> dict:
    """One configuration: base-only levels, then (LoRA on) the same batches with MIX of them on the removal arm."""
    options = config_options(model, name)
    engine = OfflineEngine.start(model, options, tokens)
    result = {"config": name, "engine_options": options, "startup_seconds": engine.startup_seconds,
              "base": [engine.level(n, ROUNDS) for n in batches], "mixed": []}
    if name == "off":
        return result
    with tempfile.TemporaryDirectory(prefix="lora-cost-") as tmp:
        removal, result["probed_values"] = removal_adapter(engine, model, Path(tmp))
        removals = {n: max(1, math.ceil(MIX * n)) for n in mix_batches}  # the first k of each batch take the arm
        loras = {n: [removal] * k + [None] * (n - k) for n, k in removals.items()}
        t0 = time.perf_counter()
        for n, lora in loras.items():  # warm-up, untimed: the adapter's first load, the LoRA kernels' first compile
            engine.level(n, 1, lora=lora)
        result["mixed_warmup_seconds"] = time.perf_counter() - t0
        for n, lora in loras.items():
            result["mixed"].append({**engine.level(n, ROUNDS, lora=lora), "removal_requests": removals[n]})
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    """Every configuration of args.configs that fits the budget, a child process each (the device call)."""
    call = DeviceCall(args.out, RESULT, args.budget_s)
    results = {**call.facts(model), "tokens": args.tokens, "rounds": ROUNDS, "mix": MIX, "configs": []}

    def measure(name: str, entry: dict, saved) -> None:
        entry.update(call.child("benchmarks.lora_cost", ["config", name, *model_args(model), "--tokens",
                                                          str(args.tokens)], f"lora-{name}.log"))

    call.in_turn(args.configs, "config", results, results["configs"], measure)
    return results


def main() -> None:
    parser, sub, p = device_parser(__doc__, "every configuration, one child process each (the device call)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    c = child_parser(sub, "config", "one configuration")
    c.add_argument("name", choices=CONFIGS)
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    c.add_argument("--mix-batches", nargs="+", type=int, default=list(MIX_BATCHES))
    dispatch(parser.parse_args(), run, {"config": lambda model, args: measure_config(
        model, args.name, tuple(args.batches), tuple(args.mix_batches), args.tokens)})


if __name__ == "__main__":
    main()
