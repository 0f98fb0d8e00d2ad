"""R1: sustained mixed load. N concurrent clients (asyncio, one task each, spread over a few channels) call in a
loop for a fixed time: Generate with and without logprobs, CompareGenerations with alphas, GetSuperWeights,
GetModelInfo. The server runs with low queue limits so that some calls are refused (RESOURCE_EXHAUSTED; a
refused client backs off). Sampled every few seconds: RSS of the front end and of the engine processes, the front
end's open fds and threads, the engine's unfinished requests and its asyncio tasks. Per minute: calls by status
code, throughput, p99 latency. At the start and the end, idle: open fds and asyncio tasks, which must be equal.
reliability.report draws the plot.

    flock /tmp/engine.lock python -m reliability.load --clients 256 --seconds 300
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections import Counter, defaultdict

import grpc

from .common import (
    asyncio_tasks,
    campaign,
    campaign_parser,
    channel,
    code_name,
    golden,
    idle_asyncio_tasks,
    metadata,
    percentile,
    process_stats,
    request_class,
    rpc,
    unfinished,
)

MIX = {"Generate": 0.45, "Generate+logprobs": 0.2, "CompareGenerations": 0.1, "GetSuperWeights": 0.125,
       "GetModelInfo": 0.125}
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
           "Explain what a super weight is in one sentence.", "Once upon a time"]
ALPHAS = (0.5, 1.5, 2.0, 3.0)
SAMPLE_EVERY = 5.0  # seconds between process samples
SERVER_LIMITS = ("--max-concurrent", "16", "--max-queue", "32")  # low enough that 256 clients get refusals


def _request(kind: str, rng: random.Random):
    sampling = {"max_tokens": rng.randint(8, 32), "temperature": rng.choice([0.0, 0.7]), "ignore_eos": True}
    if kind.startswith("Generate"):
        return request_class("Generate")(text=rng.choice(PROMPTS), sampling={
            **sampling, "logprobs": 5 if kind.endswith("logprobs") else 0})
    if kind == "CompareGenerations":
        return request_class("CompareGenerations")(text=rng.choice(PROMPTS), alphas=[rng.choice(ALPHAS)],
                                                   sampling={**sampling, "max_tokens": 8})
    return request_class(kind)()


async def _client(i: int, channels, server, t0: float, until: float, records: list, seed: int) -> None:
    rng = random.Random(seed * 7919 + i)
    ch = channels[i % len(channels)]
    md = metadata(server)
    kinds, weights = zip(*MIX.items())
    await asyncio.sleep(rng.uniform(0, 2))  # clients arrive over two seconds, not in one burst
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        method = kind.split("+")[0]
        start, tokens, code = time.monotonic(), 0, "OK"
        try:
            if method == "Generate":
                async for message in rpc(ch, method)(_request(kind, rng), metadata=md, timeout=300):
                    tokens += len(message.token_ids)
            else:
                response = await rpc(ch, method)(_request(kind, rng), metadata=md, timeout=300)
                if method == "CompareGenerations":
                    tokens = sum(len(arm.token_ids) for arm in response.arms)
        except grpc.aio.AioRpcError as e:
            code = code_name(e)
        end = time.monotonic()
        records.append((start - t0, end - t0, kind, code, tokens))
        if code != "OK":
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # a polite client backs off when refused


def _sample(server, t0: float) -> dict:
    row = {"t": round(time.monotonic() - t0, 1), **process_stats(server)}
    try:
        row["unfinished"] = unfinished(server)
        row["asyncio_tasks"] = asyncio_tasks(server)
    except OSError:
        pass
    return row


def per_minute(records: list, samples: list[dict], seconds: float, window: float = 60.0) -> list[dict]:
    """One row per window: calls by code, throughput, latency percentiles of the served calls, process sizes."""
    rows = []
    for m in range(max(1, int(round(seconds / window)))):
        lo, hi = m * window, (m + 1) * window
        done = [r for r in records if lo <= r[1] < hi]
        ok = [r for r in done if r[3] == "OK"]
        streams = [r[1] - r[0] for r in ok if r[2].startswith("Generate")]
        inside = [s for s in samples if lo <= s["t"] < hi] or samples[-1:]
        rows.append({
            "minute": m + 1, "calls": len(done), "codes": dict(Counter(r[3] for r in done)),
            "calls_per_s": round(len(ok) / window, 2), "tokens_per_s": round(sum(r[4] for r in ok) / window, 1),
            "p50_s": percentile([r[1] - r[0] for r in ok], 50), "p99_s": percentile([r[1] - r[0] for r in ok], 99),
            "generate_p99_s": percentile(streams, 99),
            # medians of the samples: one transient peak (a batch of compares) is not growth
            "frontend_rss_mib": round(statistics.median(s["frontend_rss_mib"] for s in inside), 1),
            "engine_rss_mib": round(statistics.median(s["engine_rss_mib"] for s in inside), 1),
            "engine_rss_peak_mib": round(max(s["engine_rss_mib"] for s in inside), 1),
            "fds": max(s["fds"] for s in inside)})
    return rows


def run_load(server, clients: int = 256, seconds: float = 300, seed: int = 0, channels: int = 8,
             window: float = 60.0) -> dict:
    """Drive a running server (common.Server) with `clients` concurrent clients."""
    before_golden = golden(server)
    time.sleep(2)
    start_sample = _sample(server, time.monotonic())
    tasks_start = idle_asyncio_tasks(server)
    records: list = []
    samples: list[dict] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append(_sample(server, t0))
            stop.wait(SAMPLE_EVERY)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()

    async def drive() -> None:
        chans = [channel(server, asynchronous=True) for _ in range(channels)]
        try:
            until = time.monotonic() + seconds
            await asyncio.gather(*(_client(i, chans, server, t0, until, records, seed) for i in range(clients)))
        finally:
            for ch in chans:
                await ch.close()

    asyncio.run(drive())
    elapsed = time.monotonic() - t0
    stop.set()
    thread.join()
    deadline = time.monotonic() + 60
    while unfinished(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # idle: what is still held now is held for good
    end_sample = _sample(server, t0)
    tasks_end = idle_asyncio_tasks(server)
    after_golden = golden(server)
    ok = [r for r in records if r[3] == "OK"]
    minutes = per_minute(records, samples, elapsed, window)
    first, last = minutes[0], minutes[-1]
    by_kind = defaultdict(Counter)
    for r in records:
        by_kind[r[2]][r[3]] += 1
    return {"clients": clients, "seconds": round(elapsed, 1), "seed": seed, "channels": channels,
            "calls": len(records), "codes": dict(Counter(r[3] for r in records)),
            "codes_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "tokens": sum(r[4] for r in ok), "p99_s": percentile([r[1] - r[0] for r in ok], 99),
            "per_minute": minutes, "samples": samples, "start": start_sample, "end": end_sample,
            "rss_frontend_drift": _drift(minutes, "frontend_rss_mib"),
            "rss_engine_drift": _drift(minutes, "engine_rss_mib"),
            "fds_start": start_sample["fds"], "fds_end": end_sample["fds"],
            "asyncio_tasks_start": tasks_start, "asyncio_tasks_end": tasks_end,
            "asyncio_tasks_back_to_idle": tasks_start is not None and tasks_end == tasks_start,
            "golden_unchanged": before_golden == after_golden, "server_alive": server.process.poll() is None,
            "first_window_rss_mib": [first["frontend_rss_mib"], first["engine_rss_mib"]],
            "last_window_rss_mib": [last["frontend_rss_mib"], last["engine_rss_mib"]]}


def _drift(minutes: list[dict], key: str) -> float | None:
    """Relative change of a process size from the first window to the last (the issue: within 10%)."""
    if len(minutes) < 2:
        return None
    return round(minutes[-1][key] / minutes[0][key] - 1, 4)


def main() -> int:
    parser = campaign_parser(__doc__)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()
    result = campaign("load", SERVER_LIMITS, lambda server: run_load(server, args.clients, args.seconds, args.seed),
                      front_ends=args.front_ends, kv_cache_gib=2)
    bad = set(result["codes"]) - {"OK", "RESOURCE_EXHAUSTED"}
    return 1 if bad or not result["golden_unchanged"] or not result["asyncio_tasks_back_to_idle"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
