"""Start everything: report, engine, self-check, gRPC server (+ health, reflection, auth, TLS), metrics, canary.
Shutdown: signal -> event -> health NOT_SERVING -> `server.stop(grace)` -> canary stop -> engine shutdown."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from compression.detect import DEFAULT_PROMPT, DetectionSettings
from compression.errors import UserError
from compression.evaluation import load_eval_text
from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc

from .engine import REMOVED, EngineConfig, SuperWeightEngine, installed_engine
from .metrics import Metrics
from .quality import Canary
from .service import Limits, SuperWeightService

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SuperWeightService"].full_name


class StartupError(UserError):
    """The server cannot start with this configuration, or the served model disagrees with the report."""


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0: no metrics endpoint
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 2048
    engine_options: dict = field(default_factory=dict)
    limits: Limits = Limits()
    auth_tokens: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    grace_seconds: float = 30.0
    canary_interval: float = 60.0
    prompt: str = DEFAULT_PROMPT
    detection: DetectionSettings = DetectionSettings()
    eval_text: Path | None = None
    # relative; engine against offline float32 perplexity on the report's text. None: 2% when serving float32,
    # 10% in 16-bit (bfloat16 rounding alone moves a 135M model's perplexity by a few percent)
    self_check_tolerance: float | None = None


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


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read the {what} {path}: {e.strerror}") from e


def bind(server: grpc.aio.Server, config: ServeConfig) -> int:
    address = f"{config.host}:{config.port}"
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
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    return port


def resolve_model(config: ServeConfig):
    """(checkpoint, report) to serve: a `superweights compress` artifact, verified against its manifest and
    held to its own offline evaluation, or any other source with its (cached) detection report."""
    from compression.artifact import artifact_checkpoint, is_artifact, open_artifact, served_report
    from compression.pipeline import detect

    if is_artifact(config.model):
        artifact = open_artifact(config.model)
        return artifact_checkpoint(artifact), served_report(artifact)
    return detect(config.model, prompt=config.prompt, settings=config.detection, eval_path=config.eval_text)


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
            "device": "cpu" if engine.cpu else "cuda", "max_model_len": config.max_model_len,
            "max_tokens_limit": config.limits.max_tokens}


async def check_served_super_weights(engine: SuperWeightEngine) -> list[float] | None:
    """Every reported super weight, as the engine computes with it, equals the report's value (relative 1e-4 in
    float32; 16-bit outputs round at 2^-8, so 1% there)."""
    values = await engine.served_super_weights()
    if values is None:
        log.info("self-check: super weights split across workers; not probed")
        return None
    tolerance = 1e-4 if engine.dtype == "float32" else 1e-2
    protected = engine.report.model.get("protected", True)  # False: an artifact made with --no-protect
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


async def self_check(engine: SuperWeightEngine, config: ServeConfig, eval_ids: list[int]) -> dict[str, float]:
    """The served weights against the report: through the engine, base perplexity on the report's evaluation
    tokens must match the offline baseline, and removing the super weights must cost what the report says."""
    report = engine.report
    eval_ids = eval_ids[: report.eval["tokens"]]
    window = report.eval["window"]
    variants = engine.variants if report.super_weights else ["base"]
    served = dict(zip(variants, await asyncio.gather(*(engine.perplexity(eval_ids, v, window)
                                                       for v in variants))))
    offline = report.eval["baseline_perplexity"]
    drift = abs(served["base"] / offline - 1)
    tolerance = config.self_check_tolerance or (0.02 if engine.dtype == "float32" else 0.10)
    log.info("self-check: base perplexity %.3f through the engine, %.3f offline (%.2f%%)", served["base"], offline,
             100 * drift)
    if drift > tolerance:
        raise StartupError(f"the served model disagrees with its report: perplexity {served['base']:.3f} through "
                           f"the engine against {offline:.3f} offline ({100 * drift:.1f}% apart)")
    if report.super_weights:
        await check_served_super_weights(engine)
        ratio = served[REMOVED] / served["base"]
        log.info("self-check: without super weights perplexity x%.1f (report: x%.1f)", ratio,
                 report.eval["removed_perplexity"] / offline)
        if ratio < report.settings["min_effect"]:
            raise StartupError(f"removing the reported super weights through the engine changed perplexity only "
                               f"x{ratio:.2f}: the served weights do not hold them")
    return served


class Server:
    """A running superweights server; `await Server.start(config)`, then `await server.wait()`."""

    def __init__(self, config: ServeConfig, registry: CollectorRegistry = REGISTRY):
        self.config = config
        self.metrics = Metrics(registry)
        self.registry = registry
        self.engine: SuperWeightEngine | None = None
        self.grpc: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.canary: Canary | None = None
        self.service: SuperWeightService | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> Server:
        config = self.config
        checkpoint, report = await asyncio.to_thread(resolve_model, config)
        self.metrics.super_weights.set(len(report.super_weights))
        self.metrics.engine_unfinished.set_function(
            lambda: self.engine.num_unfinished_requests() if self.engine is not None else 0)
        engine_config = EngineConfig(checkpoint=Path(checkpoint.path), device=config.device, dtype=config.dtype,
                                     max_model_len=config.max_model_len, engine_options=config.engine_options)
        self.engine = SuperWeightEngine(engine_config, report)
        if config.metrics_port:
            _, self.metrics_port = _start_metrics(config.host, config.metrics_port, self.registry)
        try:
            await self.engine.start()
            eval_ids = load_eval_text(self.engine.tokenizer, config.eval_text).ids.tolist()
            served = await self_check(self.engine, config, eval_ids)
        except BaseException:
            await self.engine.shutdown()
            raise
        info = model_info(self.engine, config, checkpoint)
        self.service = SuperWeightService(self.engine, self.metrics, config.limits, info)
        interceptors = [TokenAuth(config.auth_tokens, self.metrics)] if config.auth_tokens else []
        self.grpc = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_SuperWeightServiceServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = bind(self.grpc, config)
        await self.grpc.start()
        self.canary = Canary(self.engine, self.metrics, eval_ids[: config.detection.window], interval=config.canary_interval,
                             window=config.detection.window)
        for variant, value in served.items():
            self.metrics.canary_perplexity.labels(variant).set(value)
        self.canary.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (metrics on :%s), variants %s", checkpoint.name, config.host, self.port,
                 self.metrics_port or "off", ", ".join(self.engine.variants))
        return self

    async def stop(self) -> None:
        """Graceful and idempotent: refuse new calls, let in-flight ones finish within the grace period."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("shutting down: in-flight calls get %.0f s", self.config.grace_seconds)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.accepting = False
        if self.canary is not None:  # not client traffic: it should not compete with the calls finishing
            await self.canary.stop()
        if self.grpc is not None:
            await self.grpc.stop(self.config.grace_seconds)
        if self.engine is not None:
            await self.engine.shutdown()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _start_metrics(host: str, port: int, registry) -> tuple[object, int]:
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
    return server, server.server_port


async def run(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()
