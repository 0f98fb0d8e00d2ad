"""Where our CPU gap to `vllm serve` comes from: base traffic through the all-zero adapter (our workaround for
the CPU LoRA slot bug, docs/gpu.md) against base traffic without an adapter, in one engine, the same requests, no
server; each twice, alternating.

    .venv/bin/python -m benchmarks.zero_adapter_cost   # 8 concurrent x 64 tokens; writes benchmarks/zero_adapter.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from superweights.compression.format import BASE
from superweights.compression.pipeline import detect
from superweights.server.engine import EngineConfig, Sampling, SuperWeightEngine


async def run(concurrency: int = 8, tokens: int = 64, rounds: int = 2) -> None:
    checkpoint, report = detect(None, progress=False)
    engine = SuperWeightEngine(EngineConfig(checkpoint=checkpoint.path), report)
    await engine.start()
    await engine.load_variants()
    sampling = Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompt = engine.tokenize("The history of the whale fishery is long and")

    async def one(lora) -> int:
        n = 0
        stream = engine.engine.generate(await engine._engine_input(prompt), engine.sampling_params(sampling),
                                        f"r{time.perf_counter_ns()}-{id(lora)}-{n}", lora_request=lora)
        async for out in stream:
            n += len(out.outputs[0].token_ids)
        return n

    rates: dict[str, list[float]] = {}
    try:
        for label, lora in (("no adapter (unsafe on CPU)", None), ("zero adapter (ours)", engine.resolve(BASE).lora),
                            ("no adapter (unsafe on CPU)", None), ("zero adapter (ours)", engine.resolve(BASE).lora)):
            await asyncio.gather(*(one(lora) for _ in range(2)))  # warm-up
            t0 = time.perf_counter()
            total = 0
            for _ in range(rounds):
                total += sum(await asyncio.gather(*(one(lora) for _ in range(concurrency))))
            rate = total / (time.perf_counter() - t0)
            rates.setdefault(label, []).append(rate)
            print(f"{label}: {rate:.1f} tok/s ({concurrency} concurrent)", flush=True)
    finally:
        await engine.shutdown()
    out = Path(__file__).resolve().parent / "zero_adapter.json"
    out.write_text(json.dumps({"concurrency": concurrency, "tokens": tokens, "tokens_per_s": rates}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="batches of `concurrency` requests per figure")
    args = parser.parse_args()
    asyncio.run(run(args.concurrency, args.tokens, args.rounds))


if __name__ == "__main__":
    main()
