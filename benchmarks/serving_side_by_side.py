"""Serving side by side on one GPU: vLLM's offline `LLM` (the ceiling for a front end), our server (with text, and
token ids only), vLLM's gRPC server (smg-grpc-servicer) and vLLM's OpenAI server, one after the other, on one model
with the same engine options: 1 / 32 / 256 concurrent streams of 128 greedy tokens.

    python -m benchmarks.model_8b TOKENIZER_DIR .models/llama3-8b-shape                     # here, once
    bash benchmarks/on_gpu.sh serving_side_by_side --arms offline ours ours-ids vllm-grpc    # device call

Writes $OUT/gpu8b_serving.json after every arm (a call cut off at its limit still returns what ran) and each
server's log under $OUT/logs; an arm that would not finish within --budget-s is skipped and says so. The model is
the 8B-shaped directory on dummy weights by default; --model default serves the default model.

The engine options come from our server's own `engine_args` for the declared super weights, so every arm gets
exactly what our server asks of vLLM, plus the scheduler vLLM's own servers take on an H100/H200 written out for
all (benchmarks.served_model.SCHEDULER). `ours-engine-context` runs our server with vLLM's engine-only scheduler
fallbacks instead, at 256 streams only.

Per level, besides the client's tok/s, TTFT and ITL: the engine's own TTFT, queue and prefill time (vLLM's
histograms, differenced across the level), our servicer's TTFT, and the peaks of requests running and waiting in
the engine and of RPCs queued in our admission. Those separate the hypotheses for a TTFT gap: admission (our queue),
engine scheduling (engine queue time, waiting peak), the front end's delivery of per-token messages (client TTFT
above the servicer's), and LoRA (vllm-openai-nolora).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from benchmarks.arms import ARMS, EXTRA_ARMS, PER_CLIENT, front_ends_of, measure_arm
from benchmarks.device_call import DeviceCall, child_parser, device_parser, dispatch
from benchmarks.load import PROMPT_TOKENS
from benchmarks.offline_engine import OfflineEngine
from benchmarks.served_model import Model, engine_options, model_args, model_prompts

LEVELS = (1, 32, 256, 512)
RESULT = "gpu8b_serving.json"


def offline_levels(model: Model, levels: tuple[int, ...], tokens: int, repeat: int = 1) -> dict:
    """The offline arm: for each level, PER_CLIENT rounds of `level` prompts submitted at once, `repeat` times."""
    engine = OfflineEngine.start(model, engine_options(model), tokens)
    return {"startup_seconds": engine.startup_seconds,
            "levels": [{**engine.level(n, PER_CLIENT.get(n, 2)), "run": run} for n in levels
                       for run in range(1, repeat + 1)]}


def run(model: Model, args: argparse.Namespace) -> dict:
    """Every arm of args.arms that fits the budget, one after the other (the device call)."""
    call = DeviceCall(args.out, RESULT, args.budget_s)
    prompt_set = model_prompts(model)
    results = {**call.facts(model), "model": {**asdict(model), "path": str(model.path)},
               "config": json.loads((model.path / "config.json").read_text()), "levels": list(args.levels),
               "tokens": args.tokens, "prompt_tokens": PROMPT_TOKENS, "per_client": PER_CLIENT,
               "budget_s": args.budget_s, "arms": []}

    def measure(name: str, arm: dict, saved) -> None:
        levels = (256,) if name == "ours-engine-context" else tuple(args.levels)
        if name == "offline":  # in a child process: its GPU memory is released before the servers start
            arm.update(engine_options=engine_options(model), **call.child(
                "benchmarks.serving_side_by_side",
                ["offline", *model_args(model), "--levels", *map(str, levels), "--tokens", str(args.tokens),
                 "--repeat", str(args.repeat)], "offline.log"))
        else:
            arm.update(asyncio.run(measure_arm(name, model, prompt_set, levels, args.tokens, call.logs,
                                               args.ready_timeout, lambda partial: saved(arm.update(partial)),
                                               repeat=args.repeat, client_processes=args.client_processes)))

    call.in_turn(args.arms, "arm", results, results["arms"], measure)
    return results


def main() -> None:
    parser, sub, p = device_parser(__doc__, "every arm, one after the other (the device call)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), type=_arm, metavar="ARM",
                   help=f"of {', '.join(ARMS + EXTRA_ARMS)}; a server arm as ARM@N runs N front ends")
    p.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    p.add_argument("--ready-timeout", type=float, default=400)
    p.add_argument("--repeat", type=int, default=1, help="runs of every level, each shown (%(default)s)")
    p.add_argument("--client-processes", type=int, default=1, help="processes the clients of a level are spread "
                   "over, so the load generator does not saturate first (%(default)s)")
    c = child_parser(sub, "offline", "the offline LLM arm")
    c.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--repeat", type=int, default=1)
    dispatch(parser.parse_args(), run,
             {"offline": lambda model, args: offline_levels(model, tuple(args.levels), args.tokens, args.repeat)})


def _arm(value: str) -> str:
    if value != "offline":
        try:
            front_ends_of(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value


if __name__ == "__main__":
    main()
