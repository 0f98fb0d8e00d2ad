"""The side-by-side measuring loop: one server started, warmed up, driven at each concurrency level by N streaming
clients (fixed prompts, a fixed output length, end of sequence ignored), then stopped. Per level: throughput, the
time to first token (TTFT) and inter-token latency (ITL) percentiles, streamed messages, the front end's CPU time,
and, where the server exports metrics, what the engine saw (benchmarks.engine_metrics). Also what an A/B call of
ours costs.

The clients can run in several processes (client_processes), so that at hundreds of streams the load generator,
one Python process parsing every message, is not what saturates first."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.clients import RequestResult, open_client
from benchmarks.engine_metrics import LevelProbe, url_reader
from benchmarks.servers import RunningServer, ServerSpec, log_peaks, scheduler_facts

PROMPTS, PROMPT_TOKENS = 8, 32  # fixed prompts, cut from the evaluation text
WARM_UP_TOKENS = 16


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the one value, or NaN, where there are fewer than two."""
    if len(values) > 1:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
    return values[0] if values else float("nan")


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    errors: int
    tokens: int
    seconds: float
    frontend_cpu_seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    messages: int = 0

    def summary(self) -> dict:
        return {"server": self.server, "concurrency": self.concurrency, "requests": self.requests,
                "errors": self.errors, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds, "ttft_p50_ms": 1000 * percentile(self.ttft, 50),
                "ttft_p99_ms": 1000 * percentile(self.ttft, 99), "itl_p50_ms": 1000 * percentile(self.itl, 50),
                "itl_p99_ms": 1000 * percentile(self.itl, 99), "messages_per_s": self.messages / self.seconds,
                "tokens_per_message": self.tokens / max(self.messages, 1),
                "frontend_cpu_s_per_1k_tokens": 1000 * self.frontend_cpu_seconds / max(self.tokens, 1)}


def prompts(tokenizer, n: int = PROMPTS, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """`n` fixed prompts of `length` tokens, cut from the evaluation text."""
    from superweights.compression.evaluation import load_eval_text

    ids = load_eval_text(tokenizer).ids.tolist()
    return [ids[i * 200: i * 200 + length] for i in range(n)]


async def streams(client, prompt_set: list[list[int]], numbers: range, per_client: int,
                  max_tokens: int) -> list[RequestResult]:
    """Clients `numbers` at once, each sending `per_client` requests one after the other."""
    results: list[RequestResult] = []

    async def worker(i: int) -> None:
        for j in range(per_client):
            try:
                results.append(await client.stream(prompt_set[(i + j) % len(prompt_set)], max_tokens))
            except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal to the run
                results.append(RequestResult(float("nan"), error=repr(e)))

    await asyncio.gather(*(worker(i) for i in numbers))
    return results


def client_share(kind: str, port: int, prompt_set: list[list[int]], numbers: range, per_client: int,
                 max_tokens: int, start_at: float) -> list[RequestResult]:
    """One client process's share of a level, started at `start_at` (time.time(), the same for every process)."""
    async def share() -> list[RequestResult]:
        client = open_client(kind, port)
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            return await streams(client, prompt_set, numbers, per_client, max_tokens)
        finally:
            await client.close()

    return asyncio.run(share())


async def run_level(server: RunningServer, client, prompt_set: list[list[int]], concurrency: int,
                    per_client: int, max_tokens: int, pool: ProcessPoolExecutor | None = None) -> LevelResult:
    """`concurrency` clients at once, each sending `per_client` requests one after the other: from `client` in
    this process, or spread over the processes of `pool`, each with clients of its own."""
    cpu0 = server.cpu_seconds()
    if pool is None:
        t0 = time.perf_counter()
        results = await streams(client, prompt_set, range(concurrency), per_client, max_tokens)
        seconds = time.perf_counter() - t0
    else:
        count = pool._max_workers
        shares = [range(concurrency * k // count, concurrency * (k + 1) // count) for k in range(count)]
        start_at = time.time() + 1.0
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(*(loop.run_in_executor(pool, client_share, server.spec.client, server.spec.port,
                                                            prompt_set, share, per_client, max_tokens, start_at)
                                       for share in shares if share))
        seconds, results = time.time() - start_at, [r for part in parts for r in part]
    cpu = server.cpu_seconds() - cpu0
    ok = [r for r in results if not r.error]
    return LevelResult(server.spec.name, concurrency, len(results), len(results) - len(ok), sum(r.tokens for r in ok),
                       seconds, cpu, ttft=[r.ttft for r in ok], itl=[x for r in ok for x in r.itl],
                       messages=sum(r.messages for r in ok))


def client_pool(processes: int) -> ProcessPoolExecutor | None:
    """Client processes for the levels (spawned: no state of this process's event loop), or None for one."""
    if processes <= 1:
        return None
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"))


async def measured_level(server: RunningServer, client, prompt_set: list[list[int]], concurrency: int,
                         per_client: int, tokens: int, metrics: bool, pool: ProcessPoolExecutor | None = None) -> dict:
    """One level's summary; with metrics, and the server exporting them, its own view under "server_side"."""
    if not (metrics and server.spec.metrics_port):
        return (await run_level(server, client, prompt_set, concurrency, per_client, tokens, pool)).summary()
    with LevelProbe(url_reader(f"http://127.0.0.1:{server.spec.metrics_port}/metrics")) as probe:
        level = await run_level(server, client, prompt_set, concurrency, per_client, tokens, pool)
    return {**level.summary(), "server_side": probe.summary()}


async def measure_server(spec: ServerSpec, prompt_set: list[list[int]], levels: tuple[int, ...] | list[int],
                         tokens: int, log_dir: Path, *, per_client: Mapping[int, int], ready_timeout: float = 600,
                         checks: Callable[[int], dict] | None = None, metrics: bool = False,
                         on_level: Callable[[dict], None] | None = None, ab: bool = False, repeat: int = 1,
                         client_processes: int = 1) -> dict:
    """Start one server, warm it up, drive it at each concurrency level, stop it; a failure is recorded under
    "error", not raised (one server failing must not lose the others' numbers).

    Args:
        spec: the server to start (benchmarks.servers).
        prompt_set: token ids, taken in turn by the clients.
        levels: the concurrency levels, in order.
        tokens: greedy output tokens per request, end of sequence ignored.
        log_dir: where the server's log goes.
        per_client: requests each client sends at a level (2 where a level is not named).
        ready_timeout: seconds the server may take to serve.
        checks: called with the port once the server serves; what it returns is kept under "checks".
        metrics: read the server's own metrics around each level (LevelProbe).
        on_level: called with the result so far after each level.
        ab: also time `ab_cost` (our server only).
        repeat: run every level this many times (each run a result of its own, "run" numbering them).
        client_processes: the clients of a level spread over this many processes (1: this one).
    """
    server = RunningServer(spec, log_dir)
    result = {"command": " ".join(spec.command), "levels": [], "client_processes": client_processes}
    pool = client_pool(client_processes)
    try:
        result["startup_seconds"] = await asyncio.to_thread(server.wait_ready, ready_timeout)
        if checks:
            result["checks"] = await asyncio.to_thread(checks, spec.port)
        client = server.client()
        try:
            for p in prompt_set[:2]:  # warm-up: one request pair, and every client process started
                await client.stream(p, WARM_UP_TOKENS)
            if pool is not None:
                await run_level(server, client, prompt_set, client_processes, 1, WARM_UP_TOKENS, pool)
            for concurrency in levels:
                for run in range(1, repeat + 1):
                    level = await measured_level(server, client, prompt_set, concurrency,
                                                 per_client.get(concurrency, 2), tokens, metrics, pool)
                    result["levels"].append({**level, "run": run})
                    print(json.dumps({k: v for k, v in level.items() if k != "server_side"}), flush=True)
                    if on_level:
                        on_level(result)
            if ab:
                result["ab"] = await ab_cost(spec.port, prompt_set[0], tokens)
        finally:
            await client.close()
            if pool is not None:
                pool.shutdown()
    except Exception as e:  # noqa: BLE001 -- recorded with the result
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"{spec.name}: {result['error']}", flush=True)
    finally:
        server.stop()
        result["log_peaks"], result["scheduler"] = log_peaks(server.log), scheduler_facts(server.log)
    return result


async def ab_cost(port: int, prompt_ids: list[int], tokens: int, repeats: int = 3) -> dict:
    """CompareGenerations with two arms against one Generate of the same length and two sequential ones.

    Seconds, the median of `repeats` calls each.
    """
    import grpc

    from superweights.v1 import superweights_pb2 as pb
    from superweights.v1 import superweights_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SuperWeightServiceStub(channel)

        async def generate():
            async for _ in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=sampling)):
                pass

        async def compare():
            request = pb.CompareGenerationsRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=sampling)
            await stub.CompareGenerations(request)

        async def two_generates():
            await generate()
            await generate()

        timings = {}
        for label, fn in (("one_generate", generate), ("compare_two_arms", compare), ("two_generates", two_generates)):
            values = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                await fn()
                values.append(time.perf_counter() - t0)
            timings[label] = statistics.median(values)
    return {**timings, "repeats": repeats}
