"""Compressed artifacts on the GPU (issue: the GPU path, part 3), one engine at a time in bfloat16.

Device steps (after scripts/gpu/pack.sh's chunks are unpacked, see BENCHMARKS.md):
    python -m benchmarks.gpu_artifacts compress --art ~/art        # w8a8, fp8-dynamic, w4a16 of the default model
    python -m benchmarks.gpu_artifacts measure bf16 w8a8 --art ~/art --out $OUT
    python -m benchmarks.gpu_artifacts measure fp8-dynamic w4a16 --art ~/art --out $OUT
and here, with the fetched artifacts_*.json in benchmarks/gpu/, `python -m benchmarks.gpu_artifacts report`
rewrites BENCHMARKS.md from every saved result (benchmarks/report.py). Per model: perplexity through the engine (prompt logprobs, base and without super weights), the
super weights as the engine computes with them (SuperWeightProbe), decode tokens/s at 1 and 32 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

SCHEMES = ("w8a8", "fp8-dynamic", "w4a16")
STREAMS, TOKENS, EVAL_TOKENS = (1, 32), 128, int(os.environ.get("SUPERWEIGHTS_BENCH_EVAL_TOKENS", "4096"))


def compress_all(art: Path) -> None:
    from benchmarks.gpu_run import place_default_model
    from compression.artifact import compress
    from compression.pipeline import detect
    from compression.schemes import get_scheme

    place_default_model()
    checkpoint, report = detect(None, progress=False)
    for name in SCHEMES:
        t0 = time.perf_counter()
        artifact = compress(checkpoint, report, get_scheme(name), art / name, progress=False)
        print(json.dumps({"scheme": name, "seconds": round(time.perf_counter() - t0, 1), **artifact.evaluation}),
              flush=True)


async def _decode_speed(engine, prompt_ids: list[int], streams: int) -> float:
    from server.engine import Sampling

    sampling = Sampling(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)

    async def one() -> int:
        return sum([len(chunk.token_ids) async for chunk in engine.generate(prompt_ids, sampling)])

    await one()  # warm-up
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one() for _ in range(streams))))
    return tokens / (time.perf_counter() - t0)


async def measure_one(name: str, art: Path, device: str = "cuda", dtype: str = "bfloat16") -> dict:
    from compression.artifact import open_artifact, served_report
    from compression.evaluation import load_eval_text
    from compression.pipeline import detect
    from server.engine import REMOVED, EngineConfig, SuperWeightEngine

    if name == "bf16":
        checkpoint, report = detect(None, progress=False)
        path, offline = Path(checkpoint.path), None
    else:
        artifact = open_artifact(art / name)
        path, report, offline = artifact.path, served_report(artifact), artifact.evaluation
    options = {"gpu_memory_utilization": 0.4} if device == "cuda" else {}
    engine = SuperWeightEngine(EngineConfig(checkpoint=path, device=device, dtype=dtype, engine_options=options),
                               report)
    result = {"model": name, "date": time.strftime("%Y-%m-%d"), "offline_float32": offline}
    t0 = time.perf_counter()
    try:
        await engine.start()
        result["startup_seconds"] = round(time.perf_counter() - t0, 1)
        ids = load_eval_text(engine.tokenizer).ids.tolist()[:EVAL_TOKENS]
        result["perplexity"] = await engine.perplexity(ids, "base", 512)
        result["removed_perplexity"] = await engine.perplexity(ids, REMOVED, 512)
        result["engine_values"] = await engine.served_super_weights()
        result["report_values"] = [w.value for w in report.super_weights]
        prompt = engine.tokenize("Write a short story about a lighthouse keeper.", chat=True)
        result["decode_tok_s"] = {str(n): await _decode_speed(engine, prompt, n) for n in STREAMS}
    except Exception as e:  # one model failing must not lose the others' numbers
        cause = f" (caused by {type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        result["error"] = f"{type(e).__name__}: {e}{cause}"
    finally:
        await engine.shutdown()
    print(json.dumps(result), flush=True)
    return result


def load_artifact_runs(directory: Path) -> list[dict]:
    return [r for p in sorted(directory.glob("artifacts_*.json")) for r in json.loads(p.read_text())]


def artifact_lines(results: list[dict]) -> list[str]:
    """The artifact table of BENCHMARKS.md's GPU section (benchmarks/report.py puts it there)."""
    if not results:
        return []
    by_name = {r["model"]: r for r in results}
    bf16 = by_name.get("bf16", {})
    lines = ["", "### Compressed artifacts on the H200", "",
             "Artifacts of the default model written on the device by `superweights compress` (the same code as "
             "here); each served by vLLM 0.26.0 in bfloat16 through the superweights plugin with LoRA on "
             "(down_proj), one engine at a time. Perplexity through the engine: prompt logprobs over 4,096 tokens of "
             "the evaluation text. `offline float32` is the artifact's own evaluation.json (`superweights eval DIR`), "
             "computed on the device's CPU. `engine values` are the super weights as the engine computes with them "
             "(SuperWeightProbe: the served module's forward on x and x + e_col), against the report's 5.875732 and "
             "6.065918; a bfloat16 output rounds at 2^-8 relative, hence 5.8828. Decode: 128 greedy tokens per "
             "stream; at 1 stream a 135M model is bound by kernel launches, not by weight bytes, so those ratios "
             "are noise around 1, not a speed-up. The default model's weights come from a Q4_1 GGUF, which can "
             "flatter 4-bit schemes.", "",
             "Device steps, after the pack's chunks as above (compressed-tensors there needs loguru, and the "
             "plugin's entry point needs the package installed):", "", "```bash",
             "python3 -m pip download --no-deps --only-binary=:all: -d .whl loguru==0.7.3",
             "#   source ~/gpu/env.sh && pip install -q --no-deps --no-index --target /tmp/site .whl/loguru*.whl &&",
             "#     pip install -q --no-deps --no-build-isolation --no-index --target /tmp/sw . &&",
             "#     export PYTHONPATH=.:/tmp/sw:/tmp/site:$PYTHONPATH &&",
             "#     python -m benchmarks.gpu_artifacts compress --art ~/art                          carry .whl",
             "#   (same environment) python -m benchmarks.gpu_artifacts measure bf16 w8a8 --art ~/art --out $OUT",
             "#   (same environment) python -m benchmarks.gpu_artifacts measure fp8-dynamic w4a16 --art ~/art --out $OUT",
             "python -m benchmarks.gpu_artifacts report   # after copying the fetched artifacts_*.json to benchmarks/gpu/",
             "```", "",
             "| model | perplexity (engine) | offline float32 | no super weights (engine) | engine values | "
             "decode tok/s, 1 stream | 32 streams | vs bf16 (1 / 32) |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for name in ("bf16", *SCHEMES):
        r = by_name.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:160]} | | | | | | |")
            continue
        speed = r["decode_tok_s"]
        ratio = " / ".join(f"{speed[k] / bf16['decode_tok_s'][k]:.2f}" for k in ("1", "32")) \
            if bf16.get("decode_tok_s") else "-"
        offline = f"{r['offline_float32']['perplexity']:.2f}" if r.get("offline_float32") else "-"
        values = ", ".join(f"{v:.6f}" for v in r["engine_values"] or [])
        lines.append(f"| {name} | {r['perplexity']:.2f} | {offline} | {r['removed_perplexity']:,.0f} | {values} | "
                     f"{speed['1']:,.0f} | {speed['32']:,.0f} | {ratio} |")
    dates = ", ".join(sorted({r["date"] for r in results}))
    return lines + ["", f"Measured {dates} on the lent NVIDIA H200 (`benchmarks/gpu_artifacts.py`, device steps in "
                    "its docstring and above)."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("compress", "measure", "report"))
    parser.add_argument("names", nargs="*", help="measure: bf16 and/or schemes")
    parser.add_argument("--art", type=Path, default=Path.home() / "art")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    parser.add_argument("--device", default="cuda", help="cuda (the H200); cpu to try the script here")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.what == "compress":
        compress_all(args.art)
    elif args.what == "measure":
        args.out.mkdir(parents=True, exist_ok=True)
        results = [asyncio.run(measure_one(n, args.art, args.device, args.dtype)) for n in args.names]
        (args.out / f"artifacts_{'_'.join(args.names)}.json").write_text(json.dumps(results, indent=2))
    else:
        from benchmarks.report import load_gpu_runs, write_gpu_section

        write_gpu_section(load_gpu_runs(Path("benchmarks/gpu")), Path("BENCHMARKS.md"))


if __name__ == "__main__":
    main()
