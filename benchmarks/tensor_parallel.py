"""Tensor and pipeline parallelism across two GPUs of one host (the device kind `nvidia-h200-x2`), our server in
each arm, one after the other:

    tp2         the 8B-shaped model (bf16, dummy) at tensor_parallel_size 2: 32 and 256 streams, to set against
                one GPU (gpu8b_serving.json's `ours`); the super weights probed on every rank, base arm == base alone
    tp2-<s>     a protected artifact of benchmarks.quantized_decode (--art) at tensor_parallel_size 2: the plugin's
                correction sharded with the down-projection's input columns; with weights written, the probe
                returns the planted value
    pp2         pipeline_parallel_size 2 once, as a check: 32 streams and the same checks
    real-tp2    a real model (--real-model: one whose attention heads split in two, e.g. Qwen2.5-Coder-0.5B;
                SmolLM2-135M's 9 do not) detected and served at tensor_parallel_size 2: base keeps the answer, the
                removal arm loses it

    bash benchmarks/on_gpu.sh tensor_parallel --art ~/art8b --real-model DIR   # writes $OUT/gpu8b_tp.json
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path

from benchmarks.arms import measure_arm
from benchmarks.checks import functional_checks
from benchmarks.device_call import DeviceCall, device_parser, dispatch
from benchmarks.served_model import Model, model_prompts
from benchmarks.servers import RunningServer, ours_spec

ARMS = ("tp2", "tp2-w4a16", "pp2", "real-tp2")
LEVELS = {"tp2": (32, 256), "pp2": (32,)}  # streams; (32,) for any other arm
RESULT = "gpu8b_tp.json"


def arm_model(model: Model, name: str, art: Path) -> Model:
    """The Model an 8B arm serves: TP or PP 2, and for tp2-<scheme> the artifact of that scheme."""
    parallel = {"pipeline_parallel_size": 2} if name == "pp2" else {"tensor_parallel_size": 2}
    model = replace(model, super_weights=model.declared, extra={**model.extra, **parallel})
    if name.startswith("tp2-"):
        scheme_dir = art / name.removeprefix("tp2-")
        written = any(scheme_dir.glob("*.safetensors"))
        model = replace(model, path=scheme_dir, load_format="auto" if written else "dummy")
    return model


def real_model_arm(real_model: Path, log_dir: Path, ready_timeout: float) -> dict:
    """Detection, then our server at tensor_parallel_size 2 on a real model; the Paris checks."""
    spec = ours_spec("real-tp2", [str(real_model)], {"dtype": "bfloat16", "tensor_parallel_size": 2}, metrics=False)
    server = RunningServer(spec, log_dir)
    result = {"arm": "real-tp2", "command": " ".join(spec.command)}
    try:
        result["startup_seconds"] = server.wait_ready(ready_timeout)
        result["checks"] = functional_checks(spec.port)
    except Exception as e:  # noqa: BLE001 -- recorded, the other arms' numbers stay
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    """Every arm of args.arms that fits the budget, one after the other (the device call, two GPUs)."""
    call = DeviceCall(args.out, RESULT, args.budget_s, first_estimate=200)
    results = {**call.facts(model), "tokens": args.tokens, "arms": []}
    prompt_set = model_prompts(model)

    def measure(name: str, arm: dict, saved) -> None:
        if name == "real-tp2":
            arm.update(real_model_arm(args.real_model, call.logs, args.ready_timeout))
            return
        arm.update(asyncio.run(measure_arm("ours", arm_model(model, name, args.art), prompt_set,
                                           LEVELS.get(name, (32,)), args.tokens, call.logs, args.ready_timeout,
                                           lambda partial: saved(arm.update(partial)), label=name)))

    arms = [a for a in args.arms if a != "real-tp2" or args.real_model]
    results["arms"] += [{"arm": "real-tp2", "skipped": "no --real-model"}] if len(arms) < len(args.arms) else []
    call.in_turn(arms, "arm", results, results["arms"], measure)
    return results


def main() -> None:
    parser, _, p = device_parser(__doc__, "every arm, one after the other (the device call, two GPUs)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of {', '.join(ARMS)} (tp2-<scheme> for others)")
    p.add_argument("--art", type=Path, default=Path.home() / "art8b", help="benchmarks.quantized_decode's artifacts")
    p.add_argument("--real-model", type=Path, help="a real checkpoint whose heads split in two (Qwen 0.5B)")
    p.add_argument("--ready-timeout", type=float, default=500)
    dispatch(parser.parse_args(), run, {})


if __name__ == "__main__":
    main()
