"""Tensor and pipeline parallelism across two H200s (issue 13, item 5), one device call on `nvidia-h200-x2`.

Arms, our server each time (one after the other, both GPUs):
    tp2         the 8B-shaped model (bf16, dummy) at tensor_parallel_size 2: 32 and 256 streams against TP=1
                (gpu8b_serving.json's `ours`), the super weights probed on every rank, base arm == base alone
    tp2-<s>     a protected artifact of benchmarks.gpu_8b_quant (--art) at TP=2: the plugin's correction sharded
                with the down-projection's input columns; with weights written, the probe returns the planted value
    pp2         pipeline_parallel_size 2 once, as a check: 32 streams and the same checks
    real-tp2    a real model (--real-model: the Qwen 0.5B of the real-models issue; SmolLM2-135M's 9 heads do not
                split in two) detected and served at TP=2: base keeps the answer, the removal arm loses it

    python -m benchmarks.gpu_8b_tp run --art ~/art8b --real-model DIR --out $OUT   # writes $OUT/gpu8b_tp.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RunningServer, ServerSpec, free_port
from benchmarks.gpu_8b import (
    Budget,
    Model,
    add_run_options,
    arm_env,
    device_facts,
    measure_server,
    model_from,
    model_prompts,
    run_in_turn,
)

ARMS = ("tp2", "tp2-w4a16", "pp2", "real-tp2")
LEVELS = {"tp2": (32, 256), "pp2": (32,)}
TOKENS = 128


def arm_model(model: Model, name: str, art: Path) -> Model:
    """The Model an 8B arm serves: TP or PP 2, and for tp2-<scheme> the artifact of that scheme."""
    parallel = {"pipeline_parallel_size": 2} if name == "pp2" else {"tensor_parallel_size": 2}
    model = replace(model, super_weights=model.declared, extra={**model.extra, **parallel})
    if name.startswith("tp2-"):
        scheme_dir = art / name.removeprefix("tp2-")
        written = any(scheme_dir.glob("*.safetensors"))
        model = replace(model, path=scheme_dir, load_format="auto" if written else "dummy")
    return model


async def real_model_arm(real_model: Path, log_dir: Path, ready_timeout: float) -> dict:
    """Detection, then our server at TP=2 on a real model; the Paris checks of benchmarks.gpu_run."""
    from benchmarks.gpu_run import functional_checks

    port = free_port()
    cmd = [sys.executable, "-m", "superweights.server.cli", "-q", "serve", str(real_model), "--port", str(port),
           "--metrics-port", "0", "--canary-interval", "0", "--dtype", "bfloat16",
           "--engine-arg", "tensor_parallel_size=2"]
    server = RunningServer(ServerSpec("real-tp2", cmd, port, "ours", "grpc-health"), log_dir)
    result = {"arm": "real-tp2", "command": " ".join(cmd)}
    try:
        result["startup_seconds"] = await server.wait_ready(ready_timeout)
        result["checks"] = await asyncio.to_thread(functional_checks, port)
    except Exception as e:  # noqa: BLE001 -- recorded, the other arms' numbers stay
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    from benchmarks.gpu_env import register_plugin

    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    budget = Budget(args.budget_s, first_estimate=200)
    path = args.out / "gpu8b_tp.json"
    results = {**device_facts(), "plugin": register_plugin(), "env": arm_env(), "super_weights": model.declared, "tokens": args.tokens,
               "arms": []}
    prompt_set = model_prompts(model)

    def measure(name: str, arm: dict, saved) -> None:
        if name == "real-tp2":
            arm.update(asyncio.run(real_model_arm(args.real_model, log_dir, args.ready_timeout)))
            return
        served = arm_model(model, name, args.art)
        arm.update(asyncio.run(measure_server("ours", served, prompt_set, LEVELS.get(name, (32,)), args.tokens,
                                              log_dir, args.ready_timeout, lambda partial: saved(arm.update(partial)),
                                              label=name)))

    arms = [a for a in args.arms if a != "real-tp2" or args.real_model]
    results["arms"] += [{"arm": "real-tp2", "skipped": "no --real-model"}] if len(arms) < len(args.arms) else []
    run_in_turn(arms, "arm", results, results["arms"], path, budget, measure)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("run", help="every arm, one after the other (the device call, two GPUs)")
    add_run_options(p)
    p.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of {', '.join(ARMS)} (tp2-<scheme> for others)")
    p.add_argument("--art", type=Path, default=Path.home() / "art8b", help="benchmarks.gpu_8b_quant's artifacts")
    p.add_argument("--real-model", type=Path, help="a real checkpoint whose heads split in two (Qwen 0.5B)")
    p.add_argument("--ready-timeout", type=float, default=500)
    args = parser.parse_args()
    run(model_from(args), args)


if __name__ == "__main__":
    main()
