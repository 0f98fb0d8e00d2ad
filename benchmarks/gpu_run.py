"""The GPU half: our server and vLLM's OpenAI server on the lent H200, on the default model in bfloat16.

Device steps (see benchmarks/GPU.md): carry vLLM over with scripts/gpu/pack.sh, then in one call each
    python -m benchmarks.gpu_run ours --out $OUT    # our server: functional checks, load levels, A/B cost
    python -m benchmarks.gpu_run vllm --out $OUT    # vLLM's OpenAI server, LoRA on and off
and here `python -m benchmarks.gpu_run report benchmarks/gpu/*.json` writes the GPU section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.run_all import ab_cost
from benchmarks.serving import RunningServer, run_level, server_specs

LEVELS, TOKENS = [1, 32, 256], 128


def place_default_model() -> None:
    """No network on the device: the GGUF travels as the pack's payload; put it where the cache looks."""
    from compression.models import DEFAULT_GGUF_MEMBER, cache_dir

    payload = Path.home() / "gpu" / "payload.bin"
    target = cache_dir() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if payload.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(payload, target)


def functional_checks(port: int) -> dict:
    """Generate, GetSuperWeights, CompareGenerations; base arm == base alone; the removal arm loses Paris."""
    from server.client import SuperWeightClient

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


async def measure(name: str, checkpoint: Path, prompts, out_dir: Path, target_modules: bool) -> dict:
    (spec,) = server_specs(checkpoint, [name], dtype="bfloat16", target_modules=target_modules)
    server = RunningServer(spec, out_dir)
    result = {"server": name, "command": " ".join(spec.command), "levels": []}
    try:
        result["startup_seconds"] = await server.wait_ready(timeout=900)
        if name == "ours":
            result["checks"] = await asyncio.to_thread(functional_checks, spec.port)
        client = server.client()
        for p in prompts[:2]:
            await client.stream(p, 16)
        for concurrency in LEVELS:
            level = await run_level(server, client, prompts, concurrency, 2, TOKENS)
            result["levels"].append(level.summary())
            print(json.dumps(result["levels"][-1]), flush=True)
        if name == "ours":
            result["ab"] = await ab_cost(spec.port, prompts[0], TOKENS)
        await client.close()
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("ours", "vllm", "report"))
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    args = parser.parse_args()
    if args.what == "report":
        from benchmarks.report import write_gpu_section

        write_gpu_section([json.loads(f.read_text()) for f in args.files], Path("BENCHMARKS.md"))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    place_default_model()
    from benchmarks.run_all import prompts
    from compression.models import load_model
    from compression.pipeline import detect

    t0 = time.perf_counter()
    checkpoint, report = detect(None, progress=False)
    detect_seconds = time.perf_counter() - t0
    _, tokenizer = load_model(checkpoint)
    prompt_set = prompts(tokenizer)
    from vllm.engine.arg_utils import AsyncEngineArgs

    target_modules = "lora_target_modules" in AsyncEngineArgs.__dataclass_fields__
    names = ["ours"] if args.what == "ours" else ["vllm-openai", "vllm-openai-nolora"]
    from importlib.metadata import version

    import torch

    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "vllm": version("vllm"),
               "torch": torch.__version__, "detect_seconds": detect_seconds, "levels": LEVELS, "tokens": TOKENS,
               "lora_target_modules": target_modules, "servers": []}
    for name in names:
        results["servers"].append(asyncio.run(measure(name, Path(checkpoint.path), prompt_set, args.out,
                                                      target_modules)))
    (args.out / f"gpu_{args.what}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
