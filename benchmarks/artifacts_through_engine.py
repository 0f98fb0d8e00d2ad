"""Compressed artifacts of the default model through the engine, one engine at a time in bfloat16: perplexity
(prompt logprobs, base and without super weights), the super weights as the engine computes with them
(SuperWeightProbe), decode tokens/s at 1 and 32 streams; next to each artifact's own offline evaluation.

Device steps (after scripts/gpu/pack.sh's chunks are unpacked; BENCHMARKS.md has the environment):
    python -m benchmarks.artifacts_through_engine compress --art ~/art    # w8a8, fp8-dynamic, w4a16
    python -m benchmarks.artifacts_through_engine measure bf16 w8a8 --art ~/art --out $OUT
    python -m benchmarks.artifacts_through_engine measure fp8-dynamic w4a16 --art ~/art --out $OUT
writes $OUT/artifacts_<names>.json; with those in benchmarks/gpu/, `python -m benchmarks.report` renders them.
On this machine: `measure ... --device cpu --dtype float32` (results in benchmarks/cpu_artifacts/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from benchmarks.gpu_env import device_facts, place_default_model

SCHEMES = ("w8a8", "fp8-dynamic", "w4a16")
STREAMS, TOKENS, EVAL_TOKENS = (1, 32), 128, int(os.environ.get("SUPERWEIGHTS_BENCH_EVAL_TOKENS", "4096"))


def compress_all(art: Path) -> None:
    from superweights.compression.artifact import compress
    from superweights.compression.pipeline import detect
    from superweights.compression.schemes import get_scheme

    place_default_model()
    checkpoint, report = detect(None, progress=False)
    for name in SCHEMES:
        t0 = time.perf_counter()
        artifact = compress(checkpoint, report, get_scheme(name), art / name, progress=False)
        print(json.dumps({"scheme": name, "seconds": round(time.perf_counter() - t0, 1), **artifact.evaluation}),
              flush=True)


async def _decode_speed(engine, prompt_ids: list[int], streams: int) -> float:
    from superweights.server.engine import Sampling

    sampling = Sampling(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)

    async def one() -> int:
        return sum([len(chunk.token_ids) async for chunk in engine.generate(prompt_ids, sampling)])

    await one()  # warm-up
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one() for _ in range(streams))))
    return tokens / (time.perf_counter() - t0)


async def measure_one(name: str, art: Path, device: str = "cuda", dtype: str = "bfloat16") -> dict:
    from superweights.compression.artifact import open_artifact
    from superweights.compression.evaluation import load_eval_text
    from superweights.compression.format import BASE, REMOVED
    from superweights.compression.pipeline import detect
    from superweights.server.engine import EngineConfig, SuperWeightEngine

    if name == "bf16":
        checkpoint, report = detect(None, progress=False)
        path, offline = Path(checkpoint.path), None
    else:
        artifact = open_artifact(art / name)
        path, report, offline = artifact.path, artifact.served_report, artifact.evaluation
    options = {"gpu_memory_utilization": 0.4} if device == "cuda" else {}
    engine = SuperWeightEngine(EngineConfig(checkpoint=path, device=device, dtype=dtype, engine_options=options),
                               report)
    result = {"model": name, "date": time.strftime("%Y-%m-%d"), "tokens": TOKENS, "offline_float32": offline}
    t0 = time.perf_counter()
    try:
        await engine.start()
        await engine.load_variants()
        result["startup_seconds"] = round(time.perf_counter() - t0, 1)
        result |= device_facts()
        ids = load_eval_text(engine.tokenizer).ids.tolist()[:EVAL_TOKENS]
        result["eval_tokens"] = len(ids)
        result["perplexity"] = await engine.perplexity(ids, engine.resolve(BASE), 512)
        result["removed_perplexity"] = await engine.perplexity(ids, engine.resolve(REMOVED), 512)
        result["engine_values"] = await engine.served_super_weights()
        result["report_values"] = [w.value for w in report.super_weights]
        prompt = engine.tokenize("Write a short story about a lighthouse keeper.", chat=True)
        result["decode_tok_s"] = {str(n): await _decode_speed(engine, prompt, n) for n in STREAMS}
    except Exception as e:  # noqa: BLE001 -- one model failing must not lose the others' numbers
        cause = f" (caused by {type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        result["error"] = f"{type(e).__name__}: {e}{cause}"
    finally:
        await engine.shutdown()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("compress", "measure"))
    parser.add_argument("names", nargs="*", help="measure: bf16 and/or schemes")
    parser.add_argument("--art", type=Path, default=Path.home() / "art")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    parser.add_argument("--device", default="cuda", help="cuda (the H200); cpu to try the script here")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.what == "compress":
        compress_all(args.art)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        results = [asyncio.run(measure_one(n, args.art, args.device, args.dtype)) for n in args.names]
        (args.out / f"artifacts_{'_'.join(args.names)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
