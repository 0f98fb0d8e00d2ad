"""A server as a child process, for tests, campaigns and benchmarks: start it in its own process group with its
output in a log file, wait until it is ready, read the log's tail, stop it (SIGTERM to the server, the whole group
killed if it outlives the timeout). Works for any server command: ours, vLLM's OpenAI and gRPC servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SUPERWEIGHTS = str(Path(sys.executable).parent / "superweights")  # the console script beside this interpreter


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by `start`, in its own process group."""

    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, command: Sequence[str], log: Path, env: dict | None = None, cwd: Path | None = None
              ) -> ServerProcess:
        """Start `command` with stdout and stderr in `log`; env: variables added to this process's."""
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                       start_new_session=True)
        return cls(process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_until(self, ready: Callable[[], bool], timeout: float = 600, what: str = "ready",
                   poll: float = 1.0) -> float:
        """Seconds until `ready()` is true; RuntimeError with the log's tail when the process exits first or the
        time runs out. Exceptions from `ready()` count as not ready yet."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive():
                raise RuntimeError(f"{self.log.name}: server exited with {self.process.returncode} before it was "
                                   f"{what}:\n{self.log_tail()}")
            try:
                if ready():
                    return time.monotonic() - start
            except Exception:  # not listening yet, or answering errors while it starts
                pass
            time.sleep(poll)
        raise RuntimeError(f"{self.log.name}: server not {what} after {timeout:.0f} s:\n{self.log_tail()}")

    def send(self, sig: int) -> None:
        """`sig` to the server (not its group), if it still runs."""
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, timeout: float = 90, sig: int = signal.SIGTERM) -> int:
        """`sig` to the server, then the whole process group killed if it has not exited within `timeout`; its
        exit status."""
        self.send(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
        return self.process.returncode

    def kill_group(self) -> None:
        """SIGKILL to every process of the group (the server, its engine, whatever they started)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def grpc_health(target: str, credentials=None, service: str = "", timeout: float = 5) -> str:
    """grpc.health.v1 status of `service` at `target` ("SERVING", "NOT_SERVING", ...); raises grpc.RpcError when
    nothing answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
