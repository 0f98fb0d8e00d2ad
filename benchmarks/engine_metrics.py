"""Server-side figures for one load level, read from Prometheus text: what the engine saw, next to what the client saw.

A level is bracketed by two scrapes; the difference of a histogram's _sum and _count between them is that level's
exact mean. A sampler thread polls the gauges meanwhile (requests running and waiting in the engine, RPCs queued in
our admission) and keeps their peaks. Sources: a server's /metrics URL, or
prometheus_client's in-process registry (vLLM's offline LLM registers its metrics there).
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# (histogram, label filter): the engine's view of a request (vLLM's names) and our servicer's
HISTOGRAMS = {
    "engine_ttft": ("vllm:time_to_first_token_seconds", {}),
    "engine_queue": ("vllm:request_queue_time_seconds", {}),
    "engine_prefill": ("vllm:request_prefill_time_seconds", {}),
    "engine_itl": ("vllm:inter_token_latency_seconds", {}),
    "servicer_ttft": ("superweights_time_to_first_token_seconds", {"method": "Generate"}),
}
GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
          "admission_queued": "superweights_requests_queued"}
POLL_INTERVAL_S = 0.5  # how often the gauges are read during a level


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def url_reader(url: str, timeout: float = 5.0) -> Callable[[], Samples]:
    def read() -> Samples:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse(response.read().decode())

    return read


def registry_reader() -> Callable[[], Samples]:
    """This process's prometheus_client registry (vLLM's offline engine records into it)."""
    from prometheus_client import REGISTRY, generate_latest

    return lambda: parse(generate_latest(REGISTRY).decode())


def _matching(samples: Samples, name: str, labels: dict[str, str]) -> dict[tuple, float]:
    return {key: v for key, v in samples.items() if key[0] == name
            and all(dict(key[1]).get(k) == want for k, want in labels.items())}


def _total(samples: Samples, name: str, labels: dict[str, str]) -> float:
    return sum(_matching(samples, name, labels).values())


def histogram_delta(before: Samples, after: Samples, name: str, labels: dict[str, str]) -> dict | None:
    """Count and exact mean (ms) of the observations between two scrapes; None if there were none. (Bucket
    quantiles are left out: vLLM's first queue-time bucket ends at 300 ms, too coarse to say anything.)"""
    count = _total(after, f"{name}_count", labels) - _total(before, f"{name}_count", labels)
    if count <= 0:
        return None
    total = _total(after, f"{name}_sum", labels) - _total(before, f"{name}_sum", labels)
    return {"count": int(count), "mean_ms": 1000 * total / count}


class LevelProbe:
    """Brackets one load level: `with LevelProbe(read) as probe: ...`, then `probe.summary()`."""

    def __init__(self, read: Callable[[], Samples], interval: float = POLL_INTERVAL_S):
        self.read, self.interval = read, interval
        self.peaks = {key: 0.0 for key in GAUGES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="level-probe", daemon=True)
        self.before: Samples = {}
        self.after: Samples = {}
        self.errors = 0

    def _sample(self) -> Samples:
        try:
            return self.read()
        except Exception:  # noqa: BLE001 -- a missed scrape leaves a gap, not a failed level
            self.errors += 1
            return {}

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            samples = self._sample()
            for key, name in GAUGES.items():
                self.peaks[key] = max(self.peaks[key], _total(samples, name, {}))

    def __enter__(self) -> Self:
        self.before = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._sample()

    def summary(self) -> dict:
        histograms = {key: histogram_delta(self.before, self.after, name, labels)
                      for key, (name, labels) in HISTOGRAMS.items()}
        return {**{k: v for k, v in histograms.items() if v is not None},
                "peak": self.peaks, "scrape_errors": self.errors}
