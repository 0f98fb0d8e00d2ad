"""deploy/: the files parse, promtool accepts and unit-tests the rules, every PromQL expression names a metric
the server or the installed vLLM exports, and the Kubernetes probes target the gRPC port. Fast: no engine."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from superweights.compression.format import BASE, REMOVED
from superweights.server.metrics import Metrics
from tests.real_prometheus import (
    PROMETHEUS_CONFIG,
    RULES,
    api,
    config_for,
    query_until_all_answer,
    rule_health_when_evaluated,
    rule_names,
    running_prometheus,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES_TEST = RULES.with_name("superweights.rules.test.yml")
DASHBOARD = DEPLOY / "grafana" / "superweights-dashboard.json"
KUBERNETES = DEPLOY / "kubernetes"

# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# exposition suffixes prometheus_client adds per metric type
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
# Grafana's template variables, replaced by values Prometheus accepts when an expression is checked
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan", "atan2"}


@functools.cache
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run `bash scripts/tools.sh` (Debian package prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, timeout=120)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, label names
    (in matchers or grouping clauses), durations, numbers or Grafana variables."""
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", " ", expr)  # Grafana variables
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        name = match.group()
        if name.lower() in PROMQL_WORDS or re.match(r"\s*\(", expr[match.end():]):
            continue  # keyword, or function / aggregation
        names.add(name)
    return names


def test_promql_metric_names():
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(superweights_x_bucket{a="b", c=~"$instance"}'
            '[$__rate_interval]))) / ignoring (code) group_left vllm:y_total offset 1d > bool 1e3'
            ' and on (instance) up unless label_replace(z, "dst", "$1", "src", "(.*)")')
    assert promql_metric_names(expr) == {"superweights_x_bucket", "vllm:y_total", "up", "z"}


@functools.cache
def declared_metric_names() -> frozenset[str]:
    """Every series name server/metrics.py declares, as exported (counters with _total, histograms with
    _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    Metrics(registry)
    return frozenset(family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type])


@functools.cache
def vllm_metric_names() -> frozenset[str]:
    """Every "vllm:..." name in the installed vLLM's source (found on disk: vLLM is not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.fail("vLLM is not installed: run `bash scripts/setup.sh`")
    pattern = re.compile(r"""["'](vllm:[A-Za-z0-9_:]+)["']""")
    names = set()
    for path in Path(spec.origin).parent.rglob("*.py"):
        names.update(pattern.findall(path.read_text(errors="replace")))
    return frozenset(names)


def is_vllm_metric(name: str) -> bool:
    """vLLM declares `vllm:prompt_tokens`; the exposition (and PromQL) says `vllm:prompt_tokens_total`."""
    known = vllm_metric_names()
    return name in known or any(name.endswith(s) and name[: -len(s)] in known
                                for s in ("_total", "_bucket", "_sum", "_count", "_created"))


def unknown_metrics(exprs: list[str], also_known: set[str] = frozenset()) -> dict[str, set[str]]:
    known = declared_metric_names() | PROMETHEUS_SERIES | also_known
    unknown = {}
    for expr in exprs:
        names = {n for n in promql_metric_names(expr) if n not in known and not is_vllm_metric(n)}
        if names:
            unknown[expr] = names
    return unknown


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)[0]["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", ())]


def test_declared_metric_names_cover_our_series():
    names = declared_metric_names()
    assert {"superweights_requests_total", "superweights_time_to_first_token_seconds_bucket",
            "superweights_canary_perplexity", "superweights_requests_in_flight"} <= names
    assert "superweights_requests" not in names  # a counter is only exported with _total


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_yaml_parses(path):
    assert load_yaml(DEPLOY / path), f"{path} holds no document"


def test_prometheus_config():
    config = load_yaml(PROMETHEUS_CONFIG)[0]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "superweights"]
    assert job["static_configs"][0]["targets"] == ["localhost:9400"]  # `superweights serve` --metrics-port
    assert [PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]] == [RULES]
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))  # its rule files included
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in load_yaml(RULES_TEST)[0]["tests"]
              for case in test.get("alert_rule_test", ())}
    assert len(tested) >= 2, tested


def test_rules_name_known_metrics():
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert unknown_metrics([rule["expr"] for rule in rules()], recorded) == {}


def test_rules_cover_the_alerts_we_promised():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {"SuperWeightsServerErrors", "SuperWeightsResourceExhausted", "SuperWeightsSlowFirstToken",
            "SuperWeightsEngineRequestsLeaked", "SuperWeightsCanaryStale", "SuperWeightsCanaryFailing",
            "SuperWeightsCanaryDrift", "SuperWeightsCanaryNearRemoval"} <= alerts
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_variant_labels_are_the_engines():
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    used = {value for expr in exprs for value in re.findall(r'variant\s*=~?\s*"([^"]*)"', expr)}
    assert used and used <= {BASE, REMOVED}, used


def test_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_names_known_metrics():
    exprs = dashboard_exprs()
    assert unknown_metrics(exprs) == {}
    named = set().union(*map(promql_metric_names, exprs))
    assert any(n.startswith("vllm:") for n in named) and any(n.startswith("superweights_") for n in named)


def test_dashboard_exprs_are_promql(tmp_path):
    """promtool parses each expression (Grafana's variables replaced) as a recording rule."""
    exprs = []
    for expr in dashboard_exprs():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr}"
        exprs.append(expr)
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in
                                             enumerate(exprs)]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_prometheus_stores_our_and_vllms_names(tmp_path):
    """The shipped config, in a real Prometheus, against a prometheus_client endpoint like the server's (which
    writes `vllm:x` as `vllm_x` to Prometheus 2.x): every series arrives under the name the dashboard and
    rules query, and every rule evaluates."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.canary_perplexity.labels(BASE).set(52.3)
    metrics.canary_perplexity.labels(REMOVED).set(649539.0)
    metrics.requests.labels("GetModelInfo", "OK").inc()
    Gauge("vllm:num_requests_running", "vLLM's", ("model_name",), registry=registry).labels("m").set(0)
    Counter("vllm:prompt_tokens", "vLLM's", ("model_name",), registry=registry).labels("m").inc(7)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with running_prometheus(config_for(f"127.0.0.1:{server.server_port}"), tmp_path) as base:
            queries = ['superweights_requests_total{method="GetModelInfo", code="OK"}',
                       "vllm:num_requests_running", "vllm:prompt_tokens_total",
                       "superweights:canary_perplexity:base_over_no_super_weights"]
            results = query_until_all_answer(base, queries, timeout=30)
            assert [q for q, result in results.items() if not result] == []
            assert api(base, "/api/v1/query", query='{__name__=~"vllm_.+"}')["result"] == []  # all renamed
            health = rule_health_when_evaluated(base, timeout=30)
            assert set(health) == rule_names()
            assert {rule: state for rule, state in health.items() if state[0] != "ok"} == {}
    finally:
        server.shutdown()
        thread.join()


def kubernetes_objects() -> dict[str, dict]:
    return {doc["kind"]: doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in load_yaml(path)}


def test_kubernetes_probes_on_grpc_port():
    deployment = kubernetes_objects()["Deployment"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["command"] == ["superweights", "serve"]
    flags = dict(zip(container["args"][::2], container["args"][1::2]))
    assert flags["--host"] == "0.0.0.0"
    assert int(flags["--port"]) == ports["grpc"] == 50051
    assert int(flags["--metrics-port"]) == ports["metrics"] == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        # the server sets the overall service "" SERVING once started; the native probe asks for it by default
        assert probe["grpc"]["port"] == ports["grpc"] and probe["grpc"].get("service", "") == "", kind
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "engine start takes minutes"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(flags["--grace"])


def test_kubernetes_service_is_headless_and_selects_the_pods():
    objects = kubernetes_objects()
    service, pod = objects["Service"], objects["Deployment"]["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports
