"""Every Prometheus metric of the server, declared in one place (prefix `superweights_`; vLLM owns `vllm:`).
Variant labels are `Variant.label`: bounded, every client-chosen alpha shares "scaled".

With several front ends (server.frontends) every process writes its series to PROMETHEUS_MULTIPROC_DIR and one
endpoint serves them combined (prometheus_client's multiprocess mode, as vLLM's API servers do): counters and
histograms are summed; each gauge says how it combines (`multiprocess_mode`): "livesum" sums the front ends
alive, "mostrecent" takes the last value set (the gauges that only the first front end sets)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KL_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20)


LIVE_INTERVAL = 0.5  # seconds between readings of the live gauges in multiprocess mode


def multiprocess() -> bool:
    """Several processes write one set of series (prometheus_client reads the variable when it is imported)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def _guarded(gauge: Gauge, read: Callable[[], float]) -> Callable[[], float]:
    """`read`, except that one that raises reads NaN (logged once) instead of failing the whole endpoint: a
    callback that broke on one vLLM release once turned every scrape into an HTTP 500."""
    failed = []

    def value() -> float:
        try:
            return read()
        except Exception:  # any failure of one gauge must not cost the other series
            if not failed:
                failed.append(True)
                log.exception("metric %s cannot be read; it reads NaN", gauge._name)
            return math.nan

    return value


class Metrics:
    """Serving and quality metrics. Pass a fresh CollectorRegistry in tests."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self._live: list[tuple[Gauge, Callable[[], float]]] = []

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def gauge(name, doc, labels=(), mode="livesum"):
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        self.requests = counter("superweights_requests", "Finished RPCs by method and gRPC status code.",
                                ("method", "code"))
        self.in_flight = gauge("superweights_requests_in_flight", "RPCs being served now, by method (summed over "
                               "front ends).", ("method",))
        self.queued = gauge("superweights_requests_queued", "Engine-bound RPCs waiting for a concurrency slot "
                            "(summed over front ends).")
        self.time_to_first_token = Histogram(
            "superweights_time_to_first_token_seconds", "From RPC start to the first streamed token.",
            ("method",), buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("superweights_request_duration_seconds", "End-to-end RPC latency.", ("method",),
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = counter("superweights_prompt_tokens", "Prompt tokens received, by variant.",
                                     ("variant",))
        self.completion_tokens = counter("superweights_completion_tokens", "Tokens generated, by variant.",
                                         ("variant",))
        self.engine_unfinished = gauge("superweights_engine_unfinished_requests", "Requests the engine holds "
                                       "that have not finished (0 when idle: aborted calls leave none; summed over "
                                       "front ends).")
        self.super_weights = gauge("superweights_super_weights", "Confirmed super weights in the served model.",
                                   mode="mostrecent")
        self.served_super_weight = gauge(
            "superweights_served_super_weight", "Each super weight as the engine computes with it (probed from "
            "every rank and stage that holds it, at start-up and with each canary run).", ("layer", "row", "col"),
            mode="mostrecent")
        self.report_super_weight = gauge(
            "superweights_report_super_weight", "Each super weight's value in the served report: what "
            "superweights_served_super_weight should equal.", ("layer", "row", "col"), mode="mostrecent")
        self.asyncio_tasks = gauge("superweights_asyncio_tasks", "Unfinished asyncio tasks in the front ends' event "
                                   "loops (idle, the same before and after any traffic: none leaks; summed over "
                                   "front ends).")
        # quality: from every CompareGenerations
        self.compare_first_difference = Histogram(
            "superweights_compare_first_differing_token", "Index of the first token where an arm leaves the "
            "first arm (the sequence length when equal).", ("variant",), buckets=TOKEN_BUCKETS, registry=registry)
        self.compare_top1_agreement = Histogram(
            "superweights_compare_top1_agreement_ratio", "Share of positions where an arm's top-1 equals the "
            "first arm's, on the first arm's continuation.", ("variant",), buckets=RATIO_BUCKETS, registry=registry)
        self.compare_kl = Histogram("superweights_compare_mean_kl_topk", "Mean KL(first arm || arm) over the "
                                    "top-k, on the first arm's continuation.", ("variant",), buckets=KL_BUCKETS,
                                    registry=registry)
        self.stop_word_mass = Histogram("superweights_stop_word_mass_ratio", "Mean probability mass on stop words "
                                        "per generated token, per compare arm.", ("variant",), buckets=RATIO_BUCKETS,
                                        registry=registry)
        # quality: the background canary
        self.canary_perplexity = gauge("superweights_canary_perplexity", "Perplexity of the fixed probe text "
                                       "through the engine, per variant.", ("variant",), mode="mostrecent")
        self.canary_runs = counter("superweights_canary_runs", "Canary measurements by outcome.", ("outcome",))
        self.canary_last_run = gauge("superweights_canary_last_run_timestamp_seconds", "When the canary last "
                                     "finished a measurement.", mode="mostrecent")

    def live(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """The gauge reads `read()` at every scrape; in multiprocess mode, where a scrape reads files, every
        LIVE_INTERVAL seconds instead (refresh_live)."""
        if multiprocess():
            self._live.append((gauge, _guarded(gauge, read)))
        else:
            gauge.set_function(_guarded(gauge, read))

    async def refresh_live(self) -> None:
        """Multiprocess mode: keep the live gauges current (a task of the front end's; nothing to do otherwise)."""
        while self._live:
            for gauge, read in self._live:
                gauge.set(read())
            await asyncio.sleep(LIVE_INTERVAL)

    def observe_served(self, weights, served: list[float] | None, protected: bool = True) -> None:
        """The report's super weights (where the served weights are meant to hold them: not an artifact made with
        --no-protect) and, where the engine was probed, the values it computes with."""
        for i, w in enumerate(weights):
            labels = (str(w.layer), str(w.row), str(w.col))
            if protected:
                self.report_super_weight.labels(*labels).set(w.value)
            if served is not None:
                self.served_super_weight.labels(*labels).set(served[i])

    def count_tokens(self, variant, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(variant.label).inc(prompt)
        self.completion_tokens.labels(variant.label).inc(completion)

    def observe_compare(self, result) -> None:
        """One server.ab.CompareResult into the quality histograms and token counters."""
        for arm in result.arms:
            self.count_tokens(arm.variant, arm.prompt_tokens, len(arm.token_ids))
            self.stop_word_mass.labels(arm.variant.label).observe(arm.stop_word_mass)
        reference_length = len(result.arms[0].token_ids)
        for variant, d in result.divergences:
            first = reference_length if d.first_differing_token < 0 else d.first_differing_token
            self.compare_first_difference.labels(variant.label).observe(first)
            self.compare_top1_agreement.labels(variant.label).observe(d.top1_agreement)
            self.compare_kl.labels(variant.label).observe(d.mean_kl_topk)
