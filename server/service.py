"""The gRPC servicer: validate, call the engine, map the result. Protobuf types stop here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

import grpc

from superweights.compression.errors import UserError
from superweights.compression.evaluation import stop_word_ids
from superweights.compression.format import BASE, REMOVED
from superweights.compression.report import SuperWeight
from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc

from .ab import CompareResult, compare
from .engine import MAX_LOGPROBS, Chunk, EngineError, InvalidRequestError, Sampling, SuperWeightEngine
from .metrics import Metrics
from .variants import UnknownVariantError, VariantsBusyError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SuperWeightService"].full_name
MAX_ALPHAS = 4
ALPHA_RANGE = (-16.0, 16.0)
MAX_TEMPERATURE = 2.0  # vLLM's own bound
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512


class RequestError(Exception):
    """A request that fails with a specific gRPC status; the message is for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024
    default_max_tokens: int = 64  # for max_tokens 0; never more than max_tokens
    max_concurrent: int = 64  # engine-bound RPCs running at once
    max_queue: int = 256  # engine-bound RPCs waiting beyond that; more get RESOURCE_EXHAUSTED
    max_prompt_chars: int = 200_000

    def __post_init__(self) -> None:
        # max_concurrent 0 would queue every engine-bound call forever; a negative queue would refuse them all
        flags = {"max_tokens": "--max-tokens-limit", "max_concurrent": "--max-concurrent", "max_queue": "--max-queue"}
        for name, least in (("max_tokens", 1), ("default_max_tokens", 1), ("max_concurrent", 1), ("max_queue", 0),
                            ("max_prompt_chars", 1)):
            if getattr(self, name) < least:
                raise UserError(f"{flags.get(name, name)} must be at least {least}, got {getattr(self, name)}")


# -- proto -> internal -----------------------------------------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams, limits: Limits) -> Sampling:
    max_tokens = msg.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise invalid(f"sampling.max_tokens must be between 1 and {limits.max_tokens}, got {msg.max_tokens}")
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise invalid(f"sampling.temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature}")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise invalid(f"sampling.top_p must be in (0, 1], got {top_p}")
    if msg.top_k < -1:
        raise invalid(f"sampling.top_k must be -1 or 0 (disabled) or >= 1, got {msg.top_k}")
    if not 0 <= msg.logprobs <= MAX_LOGPROBS:
        raise invalid(f"sampling.logprobs must be between 0 and {MAX_LOGPROBS}, got {msg.logprobs}")
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise invalid(f"sampling.stop has {len(msg.stop)} strings; the limit is {MAX_STOP_STRINGS}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in msg.stop):
        raise invalid(f"sampling.stop strings must be 1 to {MAX_STOP_CHARS} characters long")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(msg.top_k, 0),
                    seed=msg.seed if msg.HasField("seed") else None, stop=tuple(msg.stop), logprobs=msg.logprobs,
                    ignore_eos=msg.ignore_eos)


def prompt_ids_from_proto(msg, engine: SuperWeightEngine, sampling: Sampling, limits: Limits,
                          max_model_len: int, scored: bool = False) -> list[int]:
    """The prompt's token ids, checked. scored: a compare, which also scores the prompt and the first arm's
    continuation together as one prompt, and vLLM wants one position beyond a prompt."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise invalid("prompt is empty: set prompt.text or prompt.token_ids")
    if kind == "text":
        if not msg.text.strip():
            raise invalid("prompt.text is empty")
        if len(msg.text) > limits.max_prompt_chars:
            raise invalid(f"prompt.text has {len(msg.text)} characters; the limit is {limits.max_prompt_chars}")
        ids = engine.tokenize(msg.text, chat=msg.chat)
        if not ids:  # e.g. control characters the tokenizer drops; vLLM would fail on an empty prompt
            raise invalid("prompt.text has no tokens for this model (only characters its tokenizer drops): send "
                          "visible text, or prompt.token_ids")
    else:
        ids = msg.token_ids.ids  # up to a million ids fit in a message: its length first, one scan at most
        if not ids:
            raise invalid("prompt.token_ids is empty")
    if len(ids) + sampling.max_tokens + scored > max_model_len:
        why = " (a compare scores prompt and continuation together: one token less than the context)" if scored else ""
        raise invalid(f"prompt has {len(ids)} tokens; with max_tokens={sampling.max_tokens} that exceeds the "
                      f"context of {max_model_len} tokens{why}: shorten the prompt or lower max_tokens")
    if kind == "token_ids":
        vocab = engine.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise invalid(f"prompt.token_ids has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return list(ids)


# -- internal -> proto -----------------------------------------------------------------------------------------
def tokens_to_proto(tokens) -> list[pb.GeneratedToken]:
    return [pb.GeneratedToken(token_id=t.token_id, token=t.token, logprob=t.logprob,
                              top=[pb.TokenLogprob(token_id=i, token=s, logprob=lp) for i, s, lp in t.top])
            for t in tokens]


def chunk_to_proto(chunk: Chunk) -> pb.GenerateResponse:
    return pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids, tokens=tokens_to_proto(chunk.tokens),
                               finish_reason=chunk.finish_reason or "", prompt_tokens=chunk.prompt_tokens,
                               completion_tokens=chunk.completion_tokens)


def weight_to_proto(w: SuperWeight) -> pb.SuperWeight:
    return pb.SuperWeight(layer=w.layer, module=w.module, row=w.row, col=w.col, value=w.value,
                          input_magnitude=w.input_magnitude, output_magnitude=w.output_magnitude,
                          perplexity_removed=w.perplexity_removed or 0.0, perplexity_ratio=w.perplexity_ratio or 0.0,
                          conditional_ratio=w.conditional_ratio or 0.0)


def report_to_proto(report, engine_values: list[float] | None = None) -> pb.SuperWeightReport:
    m, e = report.model, report.evaluation
    weights = [weight_to_proto(w) for w in report.super_weights]
    for message, value in zip(weights, engine_values or ()):
        message.engine_value = value
    return pb.SuperWeightReport(
        model_name=m.name, model_source=m.source, model_sha256=m.sha256, architecture=m.architecture,
        prompt=report.prompt, created_at=report.created_at, super_weights=weights,
        rejected_candidates=[weight_to_proto(w) for w in report.rejected_candidates],
        super_activations=[pb.SuperActivation(layer=a.layer, channel=a.channel, value=a.value,
                                              token_position=a.token_position, token=a.token)
                           for a in report.super_activations],
        eval_text=e.text, eval_tokens=e.tokens, baseline_perplexity=e.baseline_perplexity or 0.0,
        removed_perplexity=e.removed_perplexity or 0.0, control_perplexity=e.control_perplexity or 0.0,
        removed_ratio=e.removed_ratio or 0.0, control_ratio=e.control_ratio or 0.0, report_json=report.to_json())


def compare_to_proto(result: CompareResult) -> pb.CompareGenerationsResponse:
    return pb.CompareGenerationsResponse(
        arms=[pb.ArmResult(variant=a.variant.name, text=a.text, token_ids=a.token_ids, tokens=tokens_to_proto(a.tokens),
                           finish_reason=a.finish_reason, stop_word_mass=a.stop_word_mass) for a in result.arms],
        divergence=[pb.Divergence(variant=v.name, first_differing_token=d.first_differing_token,
                                  top1_agreement=d.top1_agreement, mean_kl_topk=d.mean_kl_topk)
                    for v, d in result.divergences])


class Admission:
    """At most `max_concurrent` engine-bound RPCs run; up to `max_queue` more wait; beyond that, refuse."""

    def __init__(self, limits: Limits, metrics: Metrics):
        self._slots = asyncio.Semaphore(limits.max_concurrent)
        self._capacity = limits.max_concurrent + limits.max_queue
        self._admitted = 0
        self._limits, self._metrics = limits, metrics

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._admitted >= self._capacity:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {self._limits.max_concurrent} requests running and "
                               f"{self._limits.max_queue} queued; retry later")
        self._admitted += 1
        try:
            self._metrics.queued.inc()
            try:
                await self._slots.acquire()
            finally:
                self._metrics.queued.dec()
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._admitted -= 1


STATUS = {UnknownVariantError: grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
          VariantsBusyError: grpc.StatusCode.RESOURCE_EXHAUSTED, EngineError: grpc.StatusCode.UNAVAILABLE}


class SuperWeightService(pb_grpc.SuperWeightServiceServicer):
    """Answers UNAVAILABLE until `open` hands it a started engine, and again once `accepting` is False."""

    def __init__(self, metrics: Metrics, limits: Limits):
        self.metrics, self.limits = metrics, limits
        self.admission = Admission(limits, metrics)
        self.engine: SuperWeightEngine | None = None
        self.model_info: dict = {}
        self.stop_ids: frozenset[int] = frozenset()
        self.accepting = True

    def open(self, engine: SuperWeightEngine, model_info: dict) -> None:
        self.engine, self.model_info = engine, model_info
        self.stop_ids = stop_word_ids(lambda text: engine.tokenize(text, special=False))

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext):
        """Status-code mapping, metrics and in-flight accounting for one RPC, in one place."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.in_flight.labels(method).inc()
        try:
            if not self.accepting:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            if self.engine is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is starting: the engine is not ready yet")
            yield
        except RequestError as e:
            code = e.code
            await context.abort(e.code, str(e))
        except (UnknownVariantError, InvalidRequestError, VariantsBusyError, EngineError) as e:
            code = STATUS[type(e)]
            await context.abort(code, str(e))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"internal error in {method}; see the server log")
        finally:
            self.metrics.in_flight.labels(method).dec()
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    async def Generate(self, request: pb.GenerateRequest, context):
        async with self._rpc("Generate", context):
            sampling = sampling_from_proto(request.sampling, self.limits)
            if request.token_ids_only:
                if sampling.stop:
                    raise invalid("token_ids_only cannot be combined with sampling.stop: stop strings match on "
                                  "the text the server would not decode; stop on token ids on the client instead")
                sampling = replace(sampling, detokenize=False)
            variant = self.engine.resolve(request.variant)
            ids = prompt_ids_from_proto(request, self.engine, sampling, self.limits, self.model_info["max_model_len"])
            start, first = time.perf_counter(), True
            async with self.admission.slot():
                async for chunk in self.engine.generate(ids, sampling, variant):
                    if first and chunk.token_ids:
                        self.metrics.time_to_first_token.labels("Generate").observe(time.perf_counter() - start)
                        first = False
                    if chunk.finish_reason:
                        self.metrics.count_tokens(variant, chunk.prompt_tokens, chunk.completion_tokens)
                    await context.write(chunk_to_proto(chunk))

    async def GetSuperWeights(self, request, context):
        async with self._rpc("GetSuperWeights", context):
            return pb.GetSuperWeightsResponse(report=report_to_proto(self.engine.report, self.engine.probed_values))

    async def GetModelInfo(self, request, context):
        async with self._rpc("GetModelInfo", context):
            return pb.GetModelInfoResponse(variants=self.engine.variants.names, **self.model_info)

    async def CompareGenerations(self, request: pb.CompareGenerationsRequest, context):
        async with self._rpc("CompareGenerations", context):
            sampling = sampling_from_proto(request.sampling, self.limits)
            names = list(request.variants) or [BASE, REMOVED]
            if not self.engine.report.super_weights and (set(names) - {BASE, ""} or request.alphas):
                raise invalid("this model has no confirmed super weights: it serves only 'base', so there is no "
                              "removal or scaled arm to compare (see GetSuperWeights for the rejected candidates)")
            variants = [self.engine.resolve(n) for n in names]
            if len(request.alphas) > MAX_ALPHAS:
                raise invalid(f"at most {MAX_ALPHAS} alphas per compare, got {len(request.alphas)}")
            for alpha in request.alphas:
                if not (math.isfinite(alpha) and ALPHA_RANGE[0] <= alpha <= ALPHA_RANGE[1]):
                    raise invalid(f"alphas must be finite and within {ALPHA_RANGE}, got {alpha}")
            ids = prompt_ids_from_proto(request, self.engine, sampling, self.limits, self.model_info["max_model_len"],
                                        scored=True)
            async with self.admission.slot(), self.engine.scaled_variants(list(request.alphas)) as scaled:
                arms = list({v.name: v for v in variants + scaled}.values())
                result = await compare(self.engine, ids, sampling, arms, self.stop_ids)
            self.metrics.observe_compare(result)
            return compare_to_proto(result)
