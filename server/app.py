"""Start everything: gRPC server (+ health, reflection, auth, TLS) and metrics bound first, then report, engine,
self-check, canary, engine watchdog; health SERVING last. Every resource registers its teardown as it starts
(one AsyncExitStack), so a failure half-way leaves nothing running.
Shutdown: signal or dead engine -> health NOT_SERVING -> `grpc.stop(grace)` -> the rest in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from superweights.compression.detect import DEFAULT_PROMPT, DetectionSettings
from superweights.compression.errors import UserError
from superweights.compression.evaluation import EvalText, load_eval_text
from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc

from .engine import BASE, REMOVED, EngineConfig, SuperWeightEngine, installed_engine
from .metrics import Metrics, read_at_scrape
from .quality import Canary
from .service import Limits, SuperWeightService

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SuperWeightService"].full_name


class StartupError(UserError):
    """The server cannot start with this configuration, or the served model disagrees with the report."""


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
    eval_text: Path | None = None
    # relative; engine against offline float32 perplexity on the report's text. None: 2% when serving float32,
    # 10% in 16-bit (bfloat16 rounding alone moves a 135M model's perplexity by a few percent)
    self_check_tolerance: float | None = None
    super_weights: tuple = ()  # compression.published.Coordinate: declared instead of detected
    offline_device: str = "auto"  # where detection runs (models.offline_placement): the GPU when there is one
    offline_dtype: str = "auto"


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer tokens on the superweights service; health and reflection stay open."""

    def __init__(self, tokens: tuple[str, ...], metrics: Metrics):
        self.tokens, self.metrics = tokens, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ())}
        header = metadata.get("authorization", "")
        if not header:
            return self._deny(handler, details, grpc.StatusCode.UNAUTHENTICATED,
                              "missing token: send metadata 'authorization: Bearer <token>'")
        token = header.removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens):
            return self._deny(handler, details, grpc.StatusCode.PERMISSION_DENIED, "token not accepted")
        return handler

    def _deny(self, handler, details, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], code.name).inc()

        async def deny(request, context):
            await context.abort(code, message)

        kind = "unary_stream" if handler.unary_stream else "unary_unary"
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


MALFORMED = object()  # what MalformedRequests' deserializer returns for bytes that do not parse


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse as the method's message: INVALID_ARGUMENT with a message a person can act
    on, counted, not logged. grpc.aio deserializes a request before the method runs and answers any exception
    from the deserializer UNKNOWN "Unexpected <class 'DecodeError'>", with a traceback in the log (grpc's
    _cygrpc/aio/server.pyx.pxi, _handle_exceptions); so the deserializer installed here never raises: it returns
    MALFORMED, which the wrapped method refuses. Methods with a request stream (reflection) are left as they are."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[str, tuple] = {}  # method -> (its handler, the wrapped one): handlers are per method

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._wrap(handler, details.method))
        return cached[1]

    def _wrap(self, handler, path: str):
        method = path.rsplit("/", 1)[-1]
        parse, behavior = handler.request_deserializer, handler.unary_stream or handler.unary_unary
        message = (f"{method}: the request does not parse as its protobuf message (truncated or corrupted bytes, a "
                   f"wrong wire type, or a string that is not UTF-8); send a message built from the service's .proto")

        def deserialize(raw: bytes):
            try:
                return parse(raw)
            except DecodeError:
                return MALFORMED

        async def refuse(context) -> None:
            self.metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if inspect.isasyncgenfunction(behavior):
            async def checked(request, context):
                if request is MALFORMED:
                    await refuse(context)
                async for response in behavior(request, context):
                    yield response
        elif inspect.iscoroutinefunction(behavior):
            async def checked(request, context):
                if request is MALFORMED:
                    await refuse(context)
                return await behavior(request, context)
        else:  # a synchronous method (none here): grpc runs it in a thread, where abort cannot be awaited
            return handler
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return factory(checked, request_deserializer=deserialize, response_serializer=handler.response_serializer)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read the {what} {path}: {e.strerror}") from e


def _check_free(host: str, port: int) -> None:
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


def bind(server: grpc.aio.Server, config: ServeConfig) -> int:
    address = f"{config.host}:{config.port}"
    _check_free(config.host, config.port)
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


def resolve_model(config: ServeConfig):
    """(checkpoint, report, adapters) to serve: a `superweights compress` artifact, verified against its manifest
    and held to its own offline evaluation, with its own adapters; the declared super weights (--super-weights),
    unverified; or any other source with its (cached) detection report, whose adapters the engine writes."""
    from superweights.compression.artifact import (
        artifact_adapters,
        artifact_checkpoint,
        is_artifact,
        open_artifact,
        served_report,
    )
    from superweights.compression.declared import config_only_checkpoint, declared_report
    from superweights.compression.models import resolve_checkpoint

    if is_artifact(config.model):
        artifact = open_artifact(config.model)
        return artifact_checkpoint(artifact), served_report(artifact), artifact_adapters(artifact)
    if config.super_weights:
        dummy = config.engine.engine_options.get("load_format") == "dummy"
        if dummy and not config.model:
            raise StartupError("--engine-arg load_format=dummy needs a model directory (config.json and tokenizer)")
        checkpoint = config_only_checkpoint(config.model) if dummy else resolve_checkpoint(config.model)
        return checkpoint, declared_report(checkpoint, list(config.super_weights)), {}
    checkpoint, report = _detect_in_child(config)
    return checkpoint, report, {}


def _detect_in_child(config: ServeConfig):
    """Detection in a child process that exits before vLLM starts: whatever it loaded (the whole model in the
    offline dtype, a CUDA context and its cached blocks) is returned to the system, so the engine never shares
    the machine with a second resident copy of the weights. A cached report costs no child."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from superweights.compression.pipeline import cached_report

    placement = {"device": config.offline_device, "dtype": config.offline_dtype}
    cached = cached_report(config.model, prompt=config.prompt, settings=config.detection, eval_path=config.eval_text,
                           **placement)
    if cached is not None:
        return cached
    log.info("detecting super weights in a child process (released before the engine starts)")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_detect, config.model, config.prompt, config.detection, config.eval_text,
                           placement).result()


def _detect(model, prompt, settings, eval_path, placement):
    from superweights.compression.pipeline import detect

    return detect(model, prompt=prompt, settings=settings, eval_path=eval_path, **placement)


def model_info(engine: SuperWeightEngine, config: ServeConfig, checkpoint) -> dict:
    hf_config = json.loads((Path(checkpoint.path) / "config.json").read_text())
    quant_config = hf_config.get("quantization_config", {})
    quant = quant_config.get("quant_method", "none")
    if "superweights" in quant_config:
        quant = f"{quant_config['superweights']['scheme']} ({quant_config.get('format')}, super weights protected " \
                f"by the superweights vLLM plugin)" if quant_config["superweights"]["protected_columns"] else \
                f"{quant_config['superweights']['scheme']} ({quant_config.get('format')}, unprotected)"
    return {"model_name": checkpoint.name, "model_sha256": checkpoint.sha256, "checkpoint": Path(checkpoint.path).name,
            "dtype": engine.dtype, "quantization": quant, "engine": installed_engine(),
            "device": "cpu" if engine.cpu else "cuda", "max_model_len": engine.config.max_model_len,
            "max_tokens_limit": config.limits.max_tokens}


async def check_served_super_weights(engine: SuperWeightEngine) -> list[float] | None:
    """Every reported super weight, as the engine computes with it, equals the report's value (relative 1e-4 in
    float32; 16-bit outputs round at 2^-8, so 1% there)."""
    values = await engine.served_super_weights()
    if values is None:
        log.info("self-check: no engine worker reported every super weight; not probed (see the warning above)")
        return None
    tolerance = 1e-4 if engine.dtype == "float32" else 1e-2
    protected = engine.report.facts.protected  # False: an artifact made with --no-protect
    for w, served in zip(engine.report.super_weights, values):
        log.info("self-check: %s[%d, %d] served %+.6f, report %+.6f", w.module, w.row, w.col, served, w.value)
        if abs(served - w.value) > tolerance * abs(w.value):
            if not protected:
                log.warning("self-check: this artifact was made without protection; the engine computes "
                            "%s[%d, %d] as %+.6f, the report says %+.6f", w.module, w.row, w.col, served, w.value)
                continue
            raise StartupError(f"the engine computes {w.module}[{w.row}, {w.col}] as {served:+.6f}, the report says "
                               f"{w.value:+.6f}: the served weights do not hold this super weight")
    return values


async def self_check(engine: SuperWeightEngine, config: ServeConfig, eval_text: EvalText) -> dict[str, float]:
    """The served weights against the report, through the engine: base perplexity on the report's evaluation tokens
    (in the report's windows, BOS first where the tokenizer adds one) must match the offline baseline, and removing
    the super weights must cost at least min_effect. Returns those two perplexities (the one-weight arms are left to
    the canary's first run: nothing checks them here)."""
    report = engine.report
    if report.facts.declared:  # nothing offline to hold the engine to; the values were probed or read
        await check_served_super_weights(engine)
        log.info("self-check: super weights declared (%s), not verified by detection",
                 ", ".join(report.settings["declared"]))
        return {}
    facts = report.evaluation
    eval_ids = eval_text.ids[: facts.tokens].tolist()
    arms = [BASE, REMOVED] if report.super_weights else [BASE]
    served = dict(zip(arms, await asyncio.gather(*(
        engine.perplexity(eval_ids, engine.resolve(a), facts.window, eval_text.bos_id) for a in arms))))
    offline = facts.baseline_perplexity
    drift = abs(served[BASE] / offline - 1)
    float32 = engine.dtype == "float32" and facts.dtype == "float32"
    tolerance = config.self_check_tolerance or (0.02 if float32 else 0.10)
    log.info("self-check: base perplexity %.3f through the engine, %.3f offline (%.2f%%)", served[BASE], offline,
             100 * drift)
    if drift > tolerance:
        raise StartupError(f"the served model disagrees with its report: perplexity {served[BASE]:.3f} through "
                           f"the engine against {offline:.3f} offline ({100 * drift:.1f}% apart)")
    if report.super_weights:
        await check_served_super_weights(engine)
        ratio = served[REMOVED] / served[BASE]
        log.info("self-check: without super weights perplexity x%.1f (report, on its screen: x%.1f)", ratio,
                 facts.removed_ratio)
        if ratio < report.min_effect:
            raise StartupError(f"removing the reported super weights through the engine changed perplexity only "
                               f"x{ratio:.2f}: the served weights do not hold them")
    return served


def canary_probe(eval_text: EvalText, window: int) -> list[int]:
    """The canary's fixed probe: the evaluation text's first window (BOS included where the tokenizer adds one)."""
    return eval_text.ids[: window - (eval_text.bos_id is not None)].tolist()


class Server:
    """A running superweights server: `await Server(config).start()`, then `await server.wait()`;
    `server.exit_code` says how it ended (0: asked to stop; 1: the engine died)."""

    def __init__(self, config: ServeConfig, registry: CollectorRegistry = REGISTRY):
        self.config = config
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

    async def start(self) -> Server:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()  # all_tasks takes it from the metrics thread, which runs no loop
        read_at_scrape(self.metrics.asyncio_tasks, lambda: len(asyncio.all_tasks(loop)))
        # ports first: a taken port fails in a second, before minutes of engine start
        self.service = SuperWeightService(self.metrics, config.limits)
        self.grpc = self._grpc_server()
        self.port = bind(self.grpc, config)
        self._stack.push_async_callback(self.grpc.stop, 0)
        if config.metrics_port:
            httpd = _start_metrics(config.host, config.metrics_port, self.registry)
            self._stack.callback(_stop_metrics, httpd)
            self.metrics_port = httpd.server_port
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d (NOT_SERVING until the engine is ready), metrics on :%s", config.host,
                 self.port, self.metrics_port or "off")

        checkpoint, report, adapters = await asyncio.to_thread(resolve_model, config)
        self.metrics.super_weights.set(len(report.super_weights))
        engine_config = replace(config.engine, checkpoint=Path(checkpoint.path), engine_options={
            "served_model_name": checkpoint.name, **config.engine.engine_options})
        self.engine = SuperWeightEngine(engine_config, report, adapters)
        self._stack.push_async_callback(self.engine.shutdown)
        read_at_scrape(self.metrics.engine_unfinished, self.engine.num_unfinished_requests)
        await self.engine.start()
        eval_text = load_eval_text(self.engine.tokenizer, config.eval_text)
        served = await self_check(self.engine, config, eval_text)

        self.service.open(self.engine, model_info(self.engine, config, checkpoint))
        window = report.evaluation.window
        self.canary = Canary(self.engine, self.metrics, canary_probe(eval_text, window),
                             interval=config.canary_interval, window=window, bos_id=eval_text.bos_id)
        for variant, value in served.items():
            self.metrics.canary_perplexity.labels(variant).set(value)
        self.canary.start()
        self._stack.push_async_callback(self.canary.stop)
        watchdog = asyncio.create_task(self._watch_engine(), name="superweights-engine-watchdog")
        self._stack.callback(watchdog.cancel)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d, variants %s", checkpoint.name, config.host, self.port,
                 ", ".join(self.engine.variants))

    def _grpc_server(self) -> grpc.aio.Server:
        config = self.config
        # auth first: a caller without a token is refused before its bytes are looked at
        interceptors = [TokenAuth(config.auth_tokens, self.metrics)] if config.auth_tokens else []
        server = grpc.aio.server(interceptors=[*interceptors, MalformedRequests(self.metrics)], options=[
            ("grpc.so_reuseport", 0),
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


def _start_metrics(host: str, port: int, registry):
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


def _stop_metrics(server) -> None:
    server.shutdown()
    server.server_close()


async def run(config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT (exit status 0) or until the engine dies (1)."""
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    await server.start()
    await server.wait()
    return server.exit_code
