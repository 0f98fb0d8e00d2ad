"""A real Prometheus (Debian's package, installed by scripts/tools.sh) on a loopback port, configured from
deploy/prometheus/, for tests that check what Prometheus itself stores."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "rules" / "superweights.rules.yml"


def config_for(target: str) -> dict:
    """deploy/prometheus/prometheus.yml scraping `target` and evaluating its rules every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]  # written elsewhere
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _log_tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _wait_ready(process: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):  # refused, or 503 while it starts
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus not ready after {timeout} s:\n{_log_tail(log)}")


@contextlib.contextmanager
def running_prometheus(config: dict, directory: Path, ready_timeout: float = 30) -> Iterator[str]:
    """Start `prometheus` with `config` (data and log in `directory`); yield its base URL; always stop it."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `bash scripts/tools.sh` (Debian package prometheus)")
    config_path, log = directory / "prometheus.yml", directory / "prometheus.log"
    config_path.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    with open(log, "w") as out:
        process = subprocess.Popen([binary, f"--config.file={config_path}",
                                    f"--storage.tsdb.path={directory / 'tsdb'}",
                                    f"--web.listen-address={base.removeprefix('http://')}"],
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(process, base, log, ready_timeout)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query_until_all_answer(base: str, queries: list[str], timeout: float) -> dict[str, list]:
    """Instant queries, repeated until each has at least one result or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        results = {q: api(base, "/api/v1/query", query=q)["result"] for q in queries}
        if all(results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(0.5)


def rule_health_when_evaluated(base: str, timeout: float) -> dict[tuple[str, str], tuple[str, str]]:
    """{(group, rule): (health, last error)} once no rule is "unknown" (not yet evaluated), or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        groups = api(base, "/api/v1/rules")["groups"]
        health = {(g["name"], r["name"]): (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
        if health and all(s != "unknown" for s, _ in health.values()) or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def rule_names() -> set[tuple[str, str]]:
    """(group, rule name) of every rule in the shipped rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {(g["name"], r.get("record") or r["alert"]) for g in groups for r in g["rules"]}
