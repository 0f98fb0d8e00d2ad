"""The servers a benchmark compares, as child processes on loopback: how each is started (our `superweights serve`,
vLLM's OpenAI server, vLLM's gRPC server) with the engine options every arm shares, when it is ready, its front
end's CPU time, and what its log says afterwards. Starting, the log and stopping the process group are
superweights.server.harness's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.clients import SERVED_MODEL_NAME, open_client
from benchmarks.served_model import LORA_KEYS
from superweights.server.harness import ServerProcess, free_port, grpc_health

# For every server: vLLM's periodic stats line (running / waiting, read from the logs of the gRPC server, which
# exports no metrics); and smg-grpc-servicer's additions switched off, so that its engine is the others' engine:
# its planned warm-up (generated traffic before it reports SERVING), its default of vLLM's ZMQ KV-event publisher
# on, and its CUDA-graph capture cap (the engine's own default instead). VLLM_CPU_KVCACHE_SPACE: the CPU build's
# KV cache in GiB (unused on GPU).
SERVER_ENV = {"VLLM_LOG_STATS_INTERVAL": "2", "SMG_VLLM_SERVICER_WARMUP": "off", "SMG_VLLM_SERVICER_KV_EVENTS": "0",
              "SMG_VLLM_CUDAGRAPH_CAPTURE_CAP": "engine", "VLLM_CPU_KVCACHE_SPACE": "2"}
OURS_ADMISSION = 1024  # --max-concurrent and --max-queue: our admission never holds a level back
OWN_FLAGS = {"dtype": "--dtype", "max_model_len": "--max-model-len", "seed": "--seed"}  # ours: options of its own


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    port: int
    client: str  # "ours", "ours-ids", "openai" or "vllm-grpc" (benchmarks.clients.open_client)
    metrics_port: int | None = None  # its Prometheus /metrics, where it serves them


def server_env() -> dict:
    """SERVER_ENV, a value already set in this process's environment kept."""
    return {key: os.environ.get(key, value) for key, value in SERVER_ENV.items()}


def cli_flags(options: dict) -> list[str]:
    """AsyncEngineArgs keywords as vLLM server flags (lists take several values, True is a bare switch, a dict
    is JSON: vLLM's config options such as --compilation-config)."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def ours_flags(options: dict) -> list[str]:
    """Our server's own options for what it sets itself, --engine-arg for the rest (LoRA follows the report)."""
    flags = [x for key, flag in OWN_FLAGS.items() if key in options for x in (flag, str(options[key]))]
    passed = {k: v for k, v in options.items() if k not in OWN_FLAGS and k not in LORA_KEYS}
    return flags + [x for k, v in passed.items() for x in ("--engine-arg", f"{k}={json.dumps(v)}")]


def grpc_module() -> str:
    """vLLM's gRPC launcher: vllm.entrypoints.grpc_server in 0.26, moved under launchers/ later."""
    moved = "vllm.entrypoints.launchers.grpc_server"
    return moved if importlib.util.find_spec("vllm.entrypoints.launchers") and importlib.util.find_spec(moved) \
        else "vllm.entrypoints.grpc_server"


def ours_spec(name: str, serve_args: list[str], options: dict, metrics: bool = True, front_ends: int = 1
              ) -> ServerSpec:
    """`superweights serve SERVE_ARGS` (a model and its declared super weights, or nothing: the default model) as
    `name`, with `front_ends` front-end processes; "ours-ids..." is streamed token ids only. metrics: on a port of
    its own, else off."""
    port, metrics_port = free_port(), free_port() if metrics else None
    cmd = [sys.executable, "-m", "superweights.server.cli", "-q", "serve", *serve_args, "--port", str(port),
           "--metrics-port", str(metrics_port or 0), "--canary-interval", "0", "--max-concurrent",
           str(OURS_ADMISSION * front_ends), "--max-queue", str(OURS_ADMISSION * front_ends), "--front-ends",
           str(front_ends), *ours_flags(options)]
    return ServerSpec(name, cmd, port, "ours-ids" if name.startswith("ours-ids") else "ours", metrics_port)


def vllm_spec(name: str, model_dir: Path, options: dict, metrics: bool = True, api_servers: int = 1) -> ServerSpec:
    """vLLM's OpenAI server ("vllm-openai..."; `vllm serve --api-server-count API_SERVERS`, its metrics on its own
    port) or gRPC server ("vllm-grpc"; none), started through their module entry points (vllm-cpu's `vllm` console
    script looks for the distribution "vllm")."""
    port, host = free_port(), ["--host", "127.0.0.1"]
    if name.startswith("vllm-openai"):
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), "--port", str(port),
               *host, "--served-model-name", SERVED_MODEL_NAME, "--api-server-count", str(api_servers),
               *cli_flags(options)]
        return ServerSpec(name, cmd, port, "openai", port if metrics else None)
    if name == "vllm-grpc":
        cmd = [sys.executable, "-m", grpc_module(), "--model", str(model_dir), "--port", str(port), *host,
               *cli_flags(options)]
        return ServerSpec(name, cmd, port, "vllm-grpc")
    raise ValueError(f"unknown vLLM server {name!r}: vllm-openai, vllm-openai-nolora or vllm-grpc")


def is_ready(spec: ServerSpec) -> bool:
    """Whether the server answers its health check (HTTP /health, or grpc.health.v1); raises while it does not
    listen yet."""
    if spec.client == "openai":
        with urllib.request.urlopen(f"http://127.0.0.1:{spec.port}/health", timeout=5) as response:
            return response.status == 200
    import grpc

    try:
        return grpc_health(f"127.0.0.1:{spec.port}", timeout=2) == "SERVING"
    except grpc.RpcError as e:
        # vLLM's gRPC server may register health per service only; a reachable server answers NOT_FOUND
        if spec.client == "vllm-grpc" and e.code() == grpc.StatusCode.NOT_FOUND:
            return True
        raise


class RunningServer:
    """The server of `spec`, started in its own process group with its log at LOG_DIR/<name>.log."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.process = ServerProcess.start(spec.command, log_dir / f"{spec.name}.log", env=server_env())
        self.frontend = psutil.Process(self.process.pid)

    @property
    def log(self) -> Path:
        return self.process.log

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds until it is ready; RuntimeError with the log's tail if it exits or the time runs out."""
        return self.process.wait_until(lambda: is_ready(self.spec), timeout, what="ready")

    def cpu_seconds(self) -> float:
        """CPU time of the front end: the process started and, where it runs several, its front-end children
        (ours: superweights::FrontEnd_<i>; vLLM's: APIServer_<i>); the engine processes are not counted."""
        total = 0.0
        for process in [self.frontend, *self._front_end_children()]:
            try:
                t = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def _front_end_children(self) -> list[psutil.Process]:
        found = []
        for child in self.frontend.children(recursive=True):
            try:
                title = " ".join(child.cmdline()) + child.name()
            except psutil.NoSuchProcess:
                continue
            if "FrontEnd_" in title or "APIServer" in title or "ApiServer" in title:
                found.append(child)
        return found

    def client(self):
        return open_client(self.spec.client, self.spec.port)

    def stop(self) -> None:
        self.process.stop(timeout=60)


def log_peaks(log: Path) -> dict:
    """Peaks of vLLM's periodic 'Running: N reqs, Waiting: M reqs' lines (every VLLM_LOG_STATS_INTERVAL s)."""
    pairs = [(int(r), int(w)) for r, w in re.findall(r"Running: (\d+) reqs, Waiting: (\d+) reqs",
                                                      log.read_text(errors="replace"))] if log.is_file() else []
    return {"running": max((r for r, _ in pairs), default=None), "waiting": max((w for _, w in pairs), default=None)}


def scheduler_facts(log: Path) -> dict:
    """max_num_seqs / max_num_batched_tokens as the engine logged them, where it did."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = {}
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        match = re.search(rf"{key}[=:\s]+(\d+)", text)
        if match:
            found[key] = int(match.group(1))
    return found
