"""Shared fixtures: the real default model's verified report, computed once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUPERWEIGHTS = str(Path(sys.executable).parent / "superweights")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([SUPERWEIGHTS, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def default_detection():
    """(checkpoint, report) for the embedded default model, detected afresh (not from the cache)."""
    from superweights.compression.pipeline import detect

    return detect(None, use_cache=False, progress=False)


# -- real servers on loopback ----------------------------------------------------------------------------------
import contextlib
import signal
import socket
import time
from dataclasses import dataclass

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    token: str | None = None
    tls: dict | None = None

    @property
    def target(self) -> str:
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def client(self, token: str | None = "default", timeout: float = 120):
        from superweights.server.client import SuperWeightClient

        return SuperWeightClient(self.target, token=self.token if token == "default" else token,
                                 root_cert=self.tls["ca"] if self.tls else None, timeout=timeout)

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def start_server(log: Path, *extra: str, token: str | None = None, tls: dict | None = None) -> RunningServer:
    port, metrics_port = free_port(), free_port()
    args = [SUPERWEIGHTS, "serve", "--port", str(port), "--metrics-port", str(metrics_port), "--canary-interval", "15",
            "--max-concurrent", "2", "--max-queue", "2", *extra]
    if token:
        args += ["--auth-token", token]
    if tls:
        args += ["--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    return RunningServer(process, port, metrics_port, log, token, tls)


def wait_serving(server: RunningServer, timeout: float = 600) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with server.client(timeout=5) as client:
                if client.health() == "SERVING":
                    return
        except grpc.RpcError:
            pass
        time.sleep(2)
    pytest.fail(f"server not SERVING after {timeout} s:\n{server.log_tail()}")


@contextlib.contextmanager
def serving(running: dict[str, RunningServer]):
    """Servers started together (their engines start in parallel), SERVING on entry, stopped on exit."""
    try:
        for server in running.values():
            wait_serving(server)
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory, default_detection):
    """Two real servers on the default model: "auth" (bearer tokens, plaintext) and "tls" (TLS, no auth).
    `default_detection` first, so that both start from the verified report it cached."""
    from tests.tls import make_certificates

    directory = tmp_path_factory.mktemp("servers")
    certificates = make_certificates(directory)
    with serving({"auth": start_server(directory / "auth.log", token=TOKEN),
                  "tls": start_server(directory / "tls.log", tls=certificates)}) as running:
        yield running
