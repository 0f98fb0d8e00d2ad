"""A running server: its config, the gRPC port it binds (+ health, reflection, auth, TLS), the metrics endpoint and
the lifecycle. Start-up order: ports first, then the model (server.startup), engine, self-check, canary, engine
watchdog; health SERVING last. Every resource registers its teardown as it starts (one AsyncExitStack), so a
failure half-way leaves nothing running.
Shutdown: signal or dead engine -> health NOT_SERVING -> `grpc.stop(grace)` -> the rest in reverse.
One process serves by default; with --front-ends N, server.frontends runs N of these Servers, each a front end
of one shared vLLM engine core (`front_end` set): the first does the once-per-server work, the others wait for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from superweights.compression.detect import DEFAULT_PROMPT, DetectionSettings
from superweights.compression.evaluation import load_eval_text
from superweights.compression.fsutil import write_atomic
from superweights.compression.report import SuperWeightReport
from superweights.v1 import superweights_pb2_grpc as pb_grpc

from .engine import EngineConfig, FrontEndClient, SuperWeightEngine
from .interceptors import MalformedRequests, TokenAuth
from .metrics import Metrics
from .quality import Canary
from .service import SERVICE_NAME, Limits, SuperWeightService
from .startup import (
    ResolvedModel,
    StartupError,
    canary_probe,
    model_info,
    resolve_model,
    self_check,
    served_engine_config,
)

log = logging.getLogger(__name__)
READY = "ready.json"  # in a server's run directory: the first front end's once-per-server results
ENGINE_DIED = signal.SIGUSR1  # server.frontends to its front ends: the engine core has died


class StoppedStarting(Exception):
    """SIGTERM or SIGINT came while this front end waited for the first one to be ready."""


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)  # its checkpoint is set once the model resolves
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0: no metrics endpoint
    limits: Limits = field(default_factory=Limits)
    max_message_bytes: int = 4 * 2**20  # grpc.max_receive_message_length; larger requests: RESOURCE_EXHAUSTED
    auth_tokens: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    reflection: bool = True
    grace_seconds: float = 30.0
    canary_interval: float = 60.0
    watchdog_interval: float = 0.5  # seconds between checks that the engine core is alive
    prompt: str = DEFAULT_PROMPT
    detection: DetectionSettings = field(default_factory=DetectionSettings)
    use_cache: bool = True  # False (--no-cache): detect again even if a cached report matches
    eval_text: Path | None = None
    self_check_tolerance: float | None = None  # relative; None: server.startup.self_check's default
    super_weights: tuple = ()  # compression.published.Coordinate: declared instead of detected
    offline_device: str = "auto"  # where detection runs (models.offline_placement): the GPU when there is one
    offline_dtype: str = "auto"
    front_ends: int = 1  # gRPC front-end processes on one engine core (server.frontends)


@dataclass(frozen=True)
class FrontEnd:
    """This process is front end `client.index` of a server that server.frontends launched: the model is resolved,
    the engine core runs elsewhere, adapters and READY live in `run_dir`."""

    client: FrontEndClient
    resolved: ResolvedModel
    run_dir: Path
    adapter_root: Path | None  # None: no super weights, no adapters

    @property
    def primary(self) -> bool:
        """The front end that runs the self-check, the probe and the canary for the whole server."""
        return self.client.index == 0


def share(limits: Limits, index: int, count: int) -> Limits:
    """Front end `index`'s part of the server's limits: --max-concurrent and --max-queue split as evenly as they go
    (each front end admits its part of the calls that reach it), so the server never runs more than the limit."""
    def part(total: int) -> int:
        return total // count + (index < total % count)

    return replace(limits, max_concurrent=part(limits.max_concurrent), max_queue=part(limits.max_queue))


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read the {what} {path}: {e.strerror}") from e


def check_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, with our message rather than gRPC core's log line."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}; check --host") from e
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: only a live listener conflicts
        try:
            s.bind(sockaddr)
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}; choose another with --port/--host "
                               f"or stop the other server") from e


def bind(server: grpc.aio.Server, config: ServeConfig, shared: bool = False) -> int:
    """Listen on config's host and port; shared: one of several front ends on that port (SO_REUSEPORT: the
    process that launched them checked that no one else listens there)."""
    address = f"{config.host}:{config.port}"
    if not shared:
        check_free(config.host, config.port)
    try:
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise StartupError("TLS needs both --tls-cert and --tls-key")
            credentials = grpc.ssl_server_credentials(
                [(_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))],
                root_certificates=_read(config.tls_client_ca, "client CA"),
                require_client_auth=config.tls_client_ca is not None)
            port = server.add_secure_port(address, credentials)
        else:
            if config.tls_client_ca:
                raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
            port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises on a failed bind; older releases return 0
        raise StartupError(f"cannot listen on {address}: the port is taken or the address is not this "
                           f"machine's; choose another with --port/--host") from e
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the port is taken or the address is not this machine's; "
                           f"choose another with --port/--host")
    return port



class Server:
    """A running superweights server: `await Server(config).start()`, then `await server.wait()`;
    `server.exit_code` says how it ended (0: asked to stop; 1: the engine died).

    Args:
        front_end: this process is one front end of a server that server.frontends launched; None: the whole
            server in this process.
    """

    def __init__(self, config: ServeConfig, registry: CollectorRegistry = REGISTRY, front_end: FrontEnd | None = None):
        self.config = config
        self.front_end = front_end
        self.metrics = Metrics(registry)
        self.registry = registry
        self.engine: SuperWeightEngine | None = None
        self.grpc: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.service: SuperWeightService | None = None
        self.canary: Canary | None = None
        self.port = 0
        self.metrics_port = 0
        self.exit_code = 0
        self._stack = contextlib.AsyncExitStack()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def primary(self) -> bool:
        """This process does the once-per-server work: the self-check, the probe, the canary."""
        return self.front_end is None or self.front_end.primary

    async def start(self) -> Server:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        config, front_end = self.config, self.front_end
        loop = asyncio.get_running_loop()  # all_tasks takes it from the metrics thread, which runs no loop
        self.metrics.live(self.metrics.asyncio_tasks, lambda: len(asyncio.all_tasks(loop)))
        # ports first: a taken port fails in a second, before minutes of engine start
        limits = share(config.limits, front_end.client.index, front_end.client.count) if front_end else config.limits
        self.service = SuperWeightService(self.metrics, limits)
        self.grpc = self._grpc_server()
        self.port = bind(self.grpc, config, shared=front_end is not None)
        self._stack.push_async_callback(self.grpc.stop, 0)
        if config.metrics_port and front_end is None:  # front ends: server.frontends serves them all on one port
            httpd = start_metrics(config.host, config.metrics_port, self.registry)
            self._stack.callback(stop_metrics, httpd)
            self.metrics_port = httpd.server_port
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d (NOT_SERVING until the engine is ready), metrics on :%s", config.host,
                 self.port, self.metrics_port or ("shared" if front_end else "off"))

        resolved = front_end.resolved if front_end else await asyncio.to_thread(resolve_model, config)
        self.metrics.super_weights.set(len(resolved.report.super_weights))
        self.engine = SuperWeightEngine(served_engine_config(config, resolved), resolved.report, resolved.adapters,
                                        adapter_root=front_end.adapter_root if front_end else None)
        self._stack.push_async_callback(self.engine.shutdown)
        self.metrics.live(self.metrics.engine_unfinished, self.engine.num_unfinished_requests)
        await self.engine.start(front_end.client if front_end else None)
        eval_text = load_eval_text(self.engine.tokenizer, config.eval_text)
        if self.primary:
            await self.engine.load_variants()
            served = await self_check(self.engine, eval_text, config.self_check_tolerance)
            if front_end:
                write_ready(front_end.run_dir, self.engine.report, self.engine.probed_values)
        else:
            ready = await wait_ready(front_end.run_dir, self._stop_requested)
            if ready is None:
                raise StoppedStarting("stopped before the first front end was ready")
            report, self.engine.probed_values = ready
            self.engine.attach_variants(report)
            served = {}
        self.metrics.observe_served(self.engine.report.super_weights, self.engine.probed_values,
                                    self.engine.report.model.protected)

        count, index = (front_end.client.count, front_end.client.index) if front_end else (1, 0)
        self.service.open(self.engine, model_info(self.engine, resolved, config.limits.max_tokens, count, index))
        if self.primary:
            window = self.engine.report.evaluation.window
            self.canary = Canary(self.engine, self.metrics, canary_probe(eval_text, window),
                                 interval=config.canary_interval, window=window, bos_id=eval_text.bos_id)
            for variant, value in served.items():
                self.metrics.canary_perplexity.labels(variant).set(value)
            self.canary.start()
            self._stack.push_async_callback(self.canary.stop)
        for task in (self._watch_engine(), self.metrics.refresh_live()):
            running = asyncio.create_task(task)
            self._stack.callback(running.cancel)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d, variants %s", resolved.checkpoint.name, config.host, self.port,
                 ", ".join(self.engine.variants.names))

    def _grpc_server(self) -> grpc.aio.Server:
        config = self.config
        # auth first: a caller without a token is refused before its bytes are looked at
        interceptors = [TokenAuth(config.auth_tokens, self.metrics)] if config.auth_tokens else []
        server = grpc.aio.server(interceptors=[*interceptors, MalformedRequests(self.metrics)], options=[
            ("grpc.so_reuseport", int(self.front_end is not None)),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", 4 * config.max_message_bytes)])
        pb_grpc.add_SuperWeightServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_engine(self) -> None:
        """A dead engine core makes the server NOT_SERVING at once and ends the process with status 1, so an
        orchestrator restarts it; calls in flight get UNAVAILABLE from the engine wrapper."""
        while self.engine.alive:
            await asyncio.sleep(self.config.watchdog_interval)
        log.error("the engine has died: health NOT_SERVING, shutting down with exit status 1")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.request_stop(exit_code=1)

    def engine_died(self, reason: str) -> None:
        """Told by the process that launched the engine core: it has died (the watchdog does the rest)."""
        if self.engine is not None:
            self.engine.mark_dead(reason)
        else:
            self.request_stop(exit_code=1)

    def request_stop(self, exit_code: int = 0) -> None:
        self.exit_code = max(self.exit_code, exit_code)
        self._stop_requested.set()

    async def stop(self) -> None:
        """Graceful and idempotent: refuse new calls, let in-flight ones finish within the grace period, then
        tear down the rest in reverse order of start."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("shutting down: in-flight calls get %.0f s", self.config.grace_seconds)
        await self.health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.accepting = False
        if self.canary is not None:  # not client traffic: it should not compete with the calls finishing
            await self.canary.stop()
        if self.grpc is not None:
            await self.grpc.stop(self.config.grace_seconds)
        await self._stack.aclose()
        self._stopped.set()

    async def wait(self) -> None:
        """Until stop() finished, or a stop was requested (a signal, a dead engine), in which case stop it."""
        stop_requested = asyncio.create_task(self._stop_requested.wait())
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({stop_requested, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
            stopped.cancel()
        await self.stop()


def write_ready(run_dir: Path, report: SuperWeightReport, probed: list[float] | None) -> None:
    """The first front end's once-per-server results, for the others: the served report (declared values filled
    in) and the super weights as the engine computes with them."""
    write_atomic(Path(run_dir) / READY, json.dumps({"report": report.to_dict(), "probed": probed}))


async def wait_ready(run_dir: Path, stop: asyncio.Event | None = None,
                     poll: float = 0.2) -> tuple[SuperWeightReport, list[float] | None] | None:
    """Until the first front end has written READY; None if `stop` is set first (server.frontends stops every
    front end with SIGTERM if the first one dies before it is ready)."""
    path = Path(run_dir) / READY
    while not path.exists():
        if stop is not None and stop.is_set():
            return None
        await asyncio.sleep(poll)
    ready = json.loads(path.read_text())
    return SuperWeightReport.from_dict(ready["report"]), ready["probed"]



def start_metrics(host: str, port: int, registry):
    """The Prometheus endpoint, in the text format only: prometheus_client's OpenMetrics output (what Prometheus
    2.x asks for first) writes vLLM's `vllm:*` series as `vllm_*` (client_python#1177), breaking every query."""
    import socket
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    app = make_wsgi_app(registry)

    def text_format(environ, start_response):
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # one line per scrape is noise
            pass

    try:
        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        server = make_server(host, port, text_format, Server, handler_class=Quiet)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror}; choose another with "
                           f"--metrics-port (0: none)") from e
    threading.Thread(target=server.serve_forever, name="superweights-metrics", daemon=True).start()
    return server


def stop_metrics(server) -> None:
    server.shutdown()
    server.server_close()


async def run(config: ServeConfig, front_end: FrontEnd | None = None) -> int:
    """Run until SIGTERM or SIGINT (exit status 0) or until the engine dies (1); a front end also learns of the
    engine core's death from ENGINE_DIED."""
    server = Server(config, front_end=front_end)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    if front_end is not None:
        loop.add_signal_handler(ENGINE_DIED, server.engine_died, "its process has exited")
    try:
        await server.start()
    except StoppedStarting as e:
        log.info("%s", e)
        return server.exit_code
    await server.wait()
    return server.exit_code
