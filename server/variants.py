"""The served model's arms: one registry that every front end of a server shares through a directory.

Every arm is a LoRA adapter on disk. Its vLLM LoRA id is derived from the variant, never from a counter, so front
ends that never talk to each other send the same id for the same adapter to the one engine core:
    fixed arms (base, no_super_weights, no_super_weight_<i>)   1, 2, ... in variant_specs' order
    scaled_<alpha>                                              SCALED_IDS + crc32(name) mod SCALED_ID_SPAN
Scaled arms are made on demand and at most `max_scaled` exist in the whole server. The adapter directory is the
shared state, with flock(2) as its lock (the engine core and its workers are vLLM's; this is only bookkeeping):
    the adapter directory, exclusive      while an arm is made, held or evicted (one at a time, server-wide)
    a scaled arm's directory, shared      while any front end runs a request on it
    ... exclusive, without waiting        to evict it: an arm that some request uses is never evicted
The least recently used arm (its directory's mtime, touched on every use) makes room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import shutil
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from superweights.compression.adapters import write_adapter
from superweights.compression.format import BASE, REMOVED, SCALED, VariantSpec, scaled_spec, variant_specs
from superweights.compression.report import SuperWeightReport

log = logging.getLogger(__name__)

SCALED_IDS = 1_000_000  # scaled arms' LoRA ids start here; fixed arms' stay below
SCALED_ID_SPAN = 2**30
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class UnknownVariantError(ValueError):
    def __init__(self, variant: str, known: list[str]):
        super().__init__(f"unknown variant {variant[:80]!r}; this server offers {', '.join(known)} "
                         f"(and {SCALED}<alpha> through CompareGenerations alphas; the least recently used of "
                         f"those is unloaded to make room for newer alphas)")


class VariantsBusyError(RuntimeError):
    """Every scaled variant slot is held by a running request."""


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


def lora_id(name: str, fixed: list[str]) -> int:
    """The LoRA id of a variant, the same in every process: its position among the fixed arms, else a hash."""
    if name in fixed:
        return 1 + fixed.index(name)
    return SCALED_IDS + zlib.crc32(name.encode()) % SCALED_ID_SPAN


def _lora_request(name: str, lora_int_id: int, path: Path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_int_id, lora_path=str(path))


class VariantRegistry:
    """Fixed arms for the life of the server, scaled arms on demand, all on adapters under `root`.

    Args:
        root: the server's adapter directory, shared by its front ends (None: a report without super weights).
        report: the served report (its super weights define every adapter).
        given: adapter directories by variant name that exist already (an artifact's own).
        zero_base: serve "base" through an all-zero adapter (the CPU build's LoRA slot bug: engine.py).
        max_scaled: scaled arms kept at once, server-wide.
        base_model: written into each adapter's config.
    """

    def __init__(self, root: Path | None, report: SuperWeightReport, given: dict[str, Path] | None = None,
                 zero_base: bool = False, max_scaled: int = 8, base_model: str = ""):
        self.root, self.report, self.max_scaled, self.base_model = root, report, max_scaled, base_model
        self._given = dict(given or {})
        self._specs = ([VariantSpec(BASE, "base", 1.0, ())] if zero_base and report.super_weights else []) + \
            variant_specs(report)
        self._fixed_names = [BASE] + [s.name for s in variant_specs(report)]
        self.fixed: dict[str, Variant] = {BASE: Variant(BASE, "base")}
        for spec in self._specs:
            path = self._given.get(spec.name) if spec.kind != "base" else None
            path = path or self.root / spec.name
            self.fixed[spec.name] = Variant(spec.name, spec.kind,
                                            _lora_request(spec.name, lora_id(spec.name, self._fixed_names), path),
                                            spec.alpha)
        self._lock = asyncio.Lock()  # this process's turn; flock on root serializes the processes
        self._holds: dict[str, tuple[int, int]] = {}  # scaled name -> (fd with a shared flock, requests using it)

    # -- fixed arms -----------------------------------------------------------------------------------------------
    def write_fixed(self) -> list[Variant]:
        """Write the fixed arms' adapters that are not given (once per server, before any front end uses them);
        returns the arms that have an adapter."""
        for spec in self._specs:
            variant = self.fixed[spec.name]
            if Path(variant.lora.lora_path) == self.root / spec.name:
                write_adapter(self.report, self.root / spec.name, alpha=spec.alpha, zero=spec.kind == "base",
                              weights=list(spec.weights), base_model=self.base_model)
        return [v for v in self.fixed.values() if v.lora is not None]

    # -- lookup ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every arm served now: the fixed ones, then the scaled ones, least recently used first."""
        return list(self.fixed) + [p.name for p in self._scaled_dirs()]

    def _scaled_dirs(self) -> list[Path]:
        if self.root is None:
            return []
        try:
            found = [p for p in self.root.iterdir() if p.name.startswith(SCALED) and p.is_dir()]
        except FileNotFoundError:
            return []
        with_times = []
        for p in found:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile by another front end
                with_times.append((p.stat().st_mtime_ns, p.name, p))
        return [p for _, _, p in sorted(with_times)]

    def resolve(self, name: str) -> Variant:
        """The variant a client named ("" is base); UnknownVariantError for any other name."""
        name = name or BASE
        if name in self.fixed:
            return self.fixed[name]
        if name.startswith(SCALED) and self.root is not None:
            spec = self._scaled_spec(name)
            # only a name the server itself gives a scaled arm is looked up: never a path the client spells
            if spec is not None and spec.name == name and (self.root / name / ADAPTER_FILES[0]).is_file():
                return self._scaled_variant(spec)
        raise UnknownVariantError(name, self.names)

    def _scaled_spec(self, name: str) -> VariantSpec | None:
        try:
            alpha = float(name.removeprefix(SCALED))
        except ValueError:
            return None
        return scaled_spec(self.report, alpha) if math.isfinite(alpha) else None

    def _scaled_variant(self, spec: VariantSpec) -> Variant:
        lora = _lora_request(spec.name, lora_id(spec.name, self._fixed_names), self.root / spec.name)
        return Variant(spec.name, "scaled", lora, spec.alpha)

    # -- scaled arms: made, held, evicted -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _exclusive(self):
        """The registry, exclusively: this process's other tasks wait on the asyncio lock, other front ends on
        the directory's flock (taken in a thread, so the event loop never blocks)."""
        async with self._lock:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    async def scaled(self, alpha: float, remove_lora: Callable[[int], Awaitable[object]]) -> Variant:
        """"Super weights scaled by alpha", made on first use (the least recently used idle one makes room) and
        held: release it with `release`. VariantsBusyError when every slot is in use."""
        if alpha in (0.0, 1.0):
            return self.fixed[REMOVED if alpha == 0.0 else BASE]
        if not self.report.super_weights:
            raise UnknownVariantError(f"{SCALED}{alpha:g}", self.names)
        spec = scaled_spec(self.report, alpha)
        async with self._exclusive():
            if not (self.root / spec.name / ADAPTER_FILES[0]).is_file():
                self._refuse_colliding_id(spec.name)
                await self._make_room(remove_lora)
                await asyncio.to_thread(write_adapter, self.report, self.root / spec.name, alpha=alpha,
                                        weights=list(spec.weights), base_model=self.base_model)
            self._hold(spec.name)
        return self._scaled_variant(spec)

    def _refuse_colliding_id(self, name: str) -> None:
        """Two scaled arms whose names hash to one LoRA id would share an adapter in the engine: refuse the new one
        (about one alpha in 10^8 among the arms loaded at once)."""
        taken = {lora_id(p.name, self._fixed_names): p.name for p in self._scaled_dirs()}
        other = taken.get(lora_id(name, self._fixed_names))
        if other is not None:
            raise VariantsBusyError(f"{name}'s adapter would take the LoRA id of the loaded {other}; use a slightly "
                                    f"different alpha, or retry once {other} has been unloaded")

    async def hold(self, variant: Variant) -> None:
        """Keep a scaled arm from eviction while a request uses it (fixed arms need none)."""
        if variant.kind != "scaled":
            return
        async with self._exclusive():
            if not (self.root / variant.name / ADAPTER_FILES[0]).is_file():
                raise UnknownVariantError(variant.name, self.names)
            self._hold(variant.name)

    def _hold(self, name: str) -> None:
        fd, users = self._holds.get(name, (-1, 0))
        if fd < 0:
            fd = os.open(self.root / name, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)  # never waits: only an evictor takes it exclusively, under our lock
        self._holds[name] = (fd, users + 1)
        os.utime(self.root / name)  # most recently used

    def release(self, variant: Variant) -> None:
        if variant.kind != "scaled" or variant.name not in self._holds:
            return
        fd, users = self._holds[variant.name]
        if users > 1:
            self._holds[variant.name] = (fd, users - 1)
            return
        del self._holds[variant.name]
        os.close(fd)

    async def _make_room(self, remove_lora: Callable[[int], Awaitable[object]]) -> None:
        """Under the exclusive lock: evict idle scaled arms, least recently used first, until one more fits."""
        scaled = self._scaled_dirs()
        while len(scaled) >= self.max_scaled:
            evicted = None
            for path in scaled:
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a request of some front end uses it
                    os.close(fd)
                    continue
                try:
                    await remove_lora(lora_id(path.name, self._fixed_names))
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(fd)
                evicted = path
                break
            if evicted is None:
                raise VariantsBusyError(f"all {self.max_scaled} scaled variants are in use by running requests; "
                                        f"retry later or reuse one of their alphas")
            scaled.remove(evicted)
