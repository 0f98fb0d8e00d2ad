"""The metrics module on its own: a gauge read at scrape time that fails costs only itself."""

import math

from prometheus_client import CollectorRegistry, generate_latest

from superweights.server.metrics import Metrics


def test_a_failing_gauge_reads_nan_and_the_scrape_still_works():
    """Found on the H200: vLLM 0.26's AsyncLLM lacks get_num_unfinished_requests, the gauge's callback raised, and
    every scrape of /metrics was an HTTP 500, vLLM's series and ours with it."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def broken() -> float:
        raise AttributeError("'AsyncLLM' object has no attribute 'get_num_unfinished_requests'")

    metrics.live(metrics.engine_unfinished, broken)
    metrics.live(metrics.asyncio_tasks, lambda: 7)
    text = generate_latest(registry).decode()
    assert "superweights_asyncio_tasks 7.0" in text
    value = next(line for line in text.splitlines() if line.startswith("superweights_engine_unfinished_requests "))
    assert math.isnan(float(value.split()[1]))
    assert generate_latest(registry)  # and again: logged once, still NaN, still no exception
