"""A real Prometheus (Debian's package, scripts/tools.sh) scrapes a real server with deploy/prometheus's
config: our series, vLLM's and the canary's come back through Prometheus's own HTTP API, and it loads and
evaluates deploy/prometheus's rules."""

from __future__ import annotations

import pytest

from tests import real_prometheus
from tests.conftest import CANARY_INTERVAL_S

pytestmark = pytest.mark.slow

POLL_SECONDS = 2 * CANARY_INTERVAL_S  # the test servers' canary period; this Prometheus scrapes and evaluates every
# second


@pytest.fixture(scope="module")
def prometheus(servers, tmp_path_factory):
    """The base URL of a Prometheus scraping servers["auth"], with our rules loaded."""
    config = real_prometheus.config_for(f"127.0.0.1:{servers['auth'].metrics_port}")
    with real_prometheus.running_prometheus(config, tmp_path_factory.mktemp("prometheus")) as base:
        yield base


def test_prometheus_scrapes_our_vllm_and_canary_series(servers, prometheus):
    with servers["auth"].client() as client:
        client.model_info()  # one finished RPC: superweights_requests_total has no series before the first
    queries = ['superweights_requests_total{job="superweights", method="GetModelInfo", code="OK"}',
               'vllm:num_requests_running{job="superweights"}',
               'superweights_canary_perplexity{job="superweights", variant="base"}',
               'superweights_canary_runs_total{job="superweights", outcome="ok"} > 0',  # the canary has run
               "superweights:canary_perplexity:base_over_no_super_weights"]  # a recording rule, evaluated
    results = real_prometheus.query_until_all_answer(prometheus, queries, POLL_SECONDS)
    missing = [q for q, result in results.items() if not result]
    assert not missing, f"no result after {POLL_SECONDS} s for {missing}; targets: " \
                        f"{real_prometheus.api(prometheus, '/api/v1/targets')['activeTargets']}"
    [ratio] = results["superweights:canary_perplexity:base_over_no_super_weights"]
    assert float(ratio["value"][1]) < 1 / 50  # removing the default model's super weights: x12,000


def test_prometheus_loads_and_evaluates_our_rules(prometheus):
    health = real_prometheus.rule_health_when_evaluated(prometheus, POLL_SECONDS)
    assert set(health) == real_prometheus.rule_names()
    assert {rule: state for rule, state in health.items() if state[0] != "ok"} == {}
