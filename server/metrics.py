"""Every Prometheus metric of the server, declared in one place (prefix `superweights_`; vLLM owns `vllm:`).
Variant labels are `Variant.label`: bounded, every client-chosen alpha shares "scaled"."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KL_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20)


def read_at_scrape(gauge: Gauge, read: Callable[[], float]) -> None:
    """The gauge reads `read()` at every scrape. One that raises reads NaN (logged once) instead of failing the
    whole endpoint: a callback that broke on one vLLM release once turned every scrape into an HTTP 500."""
    failed = []

    def value() -> float:
        try:
            return read()
        except Exception:  # any failure of one gauge must not cost the other series
            if not failed:
                failed.append(True)
                log.exception("metric %s cannot be read; it reads NaN", gauge._name)
            return math.nan

    gauge.set_function(value)


class Metrics:
    """Serving and quality metrics. Pass a fresh CollectorRegistry in tests."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        self.requests = counter("superweights_requests", "Finished RPCs by method and gRPC status code.",
                                ("method", "code"))
        self.in_flight = Gauge("superweights_requests_in_flight", "RPCs being served now, by method.", ("method",),
                               registry=registry)
        self.queued = Gauge("superweights_requests_queued", "Engine-bound RPCs waiting for a concurrency slot.",
                            registry=registry)
        self.time_to_first_token = Histogram(
            "superweights_time_to_first_token_seconds", "From RPC start to the first streamed token.",
            ("method",), buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("superweights_request_duration_seconds", "End-to-end RPC latency.", ("method",),
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = counter("superweights_prompt_tokens", "Prompt tokens received, by variant.",
                                     ("variant",))
        self.completion_tokens = counter("superweights_completion_tokens", "Tokens generated, by variant.",
                                         ("variant",))
        self.engine_unfinished = Gauge("superweights_engine_unfinished_requests", "Requests the engine holds "
                                       "that have not finished (0 when idle: aborted calls leave none).",
                                       registry=registry)
        self.super_weights = Gauge("superweights_super_weights", "Confirmed super weights in the served model.",
                                   registry=registry)
        self.asyncio_tasks = Gauge("superweights_asyncio_tasks", "Unfinished asyncio tasks in the front end's event "
                                   "loop (idle, the same before and after any traffic: none leaks).",
                                   registry=registry)
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
        self.canary_perplexity = Gauge("superweights_canary_perplexity", "Perplexity of the fixed probe text "
                                       "through the engine, per variant.", ("variant",), registry=registry)
        self.canary_runs = counter("superweights_canary_runs", "Canary measurements by outcome.", ("outcome",))
        self.canary_last_run = Gauge("superweights_canary_last_run_timestamp_seconds", "When the canary last "
                                     "finished a measurement.", registry=registry)

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
