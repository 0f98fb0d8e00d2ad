"""Shared fixtures: the real default model's verified report, computed once per test session, and two real servers
on it (reliability.common's harness, which the campaigns use too)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability import common
from reliability.certs import make_mtls
from reliability.common import free_port, wait_serving
from reliability.security import locked_down_flags

__all__ = ["TOKEN", "assert_clean_engine_death", "free_port", "run_cli", "serving", "start_server", "wait_serving"]

SUPERWEIGHTS = str(Path(sys.executable).parent / "superweights")
TOKEN = "test-token-0123456789"
# every test server: a canary every minute (each run scores 512 tokens per fixed arm: more often, it would take a
# good share of the machine's two cores from every other test), and limits that a handful of calls reach
CANARY_INTERVAL_S = 60
TEST_FLAGS = ("--canary-interval", str(CANARY_INTERVAL_S), "--max-concurrent", "2", "--max-queue", "2")
# servers["tls"]: two front ends, each admitting 2 running and 2 queued calls (a client's calls share one
# connection, so they reach one front end: the same limits as the one-process "auth" server's)
TLS_FLAGS = ("--front-ends", "2", "--max-concurrent", "4", "--max-queue", "4", "--grace", "60")
ENDS_SERVER_SCOPES = ("module", "session")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([SUPERWEIGHTS, *args], capture_output=True, text=True, timeout=timeout, env=env)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "ends_server(scope): the test stops the server it uses, one of a "
                            f"{' or '.join(ENDS_SERVER_SCOPES)}-scoped fixture: it runs after every other test of "
                            "that module, or of the session")


def _ends_server(item) -> str | None:
    marker = item.get_closest_marker("ends_server")
    if marker is None:
        return None
    scope = marker.args[0] if marker.args else marker.kwargs.get("scope")
    if scope not in ENDS_SERVER_SCOPES:
        raise pytest.UsageError(f"{item.nodeid}: ends_server takes one of {ENDS_SERVER_SCOPES}, got {scope!r}")
    return scope


def pytest_collection_modifyitems(config, items) -> None:
    """A test that ends a shared server runs after the server's other users, by its marker, not its name: a
    module-scoped server's ender last in its module (so the module's fixtures are not set up twice), a
    session-scoped one's last in the session; otherwise the collection order is kept."""
    ordinary, module_enders, session_enders = [], {}, []
    for item in items:
        scope = _ends_server(item)
        if scope == "session":
            session_enders.append(item)
        elif scope == "module":
            module_enders.setdefault(item.path, []).append(item)
        else:
            ordinary.append(item)
    ordered = []
    for i, item in enumerate(ordinary):
        ordered.append(item)
        if i + 1 == len(ordinary) or ordinary[i + 1].path != item.path:
            ordered += module_enders.pop(item.path, [])
    items[:] = ordered + [item for enders in module_enders.values() for item in enders] + session_enders


def assert_clean_engine_death(result: dict) -> None:
    """What an engine core SIGKILLed under load must leave (reliability.faults.engine_kill_under_load's result):
    every call in flight at the kill, each ended UNAVAILABLE within 5 s and none hung, health not SERVING within
    5 s, new calls refused, exit status 1, no process left."""
    print(f"\nSIGKILL: {result}")
    assert result["all_inside_engine_at_kill"] and result["ended_before_kill"] == 0, result["calls"]
    assert result["hung"] == 0 and result["codes"] == ["UNAVAILABLE"], result["calls"]
    assert all(c["ended_after_kill_s"] <= 5 for c in result["calls"]), result["calls"]
    assert result["not_serving_after_s"] is not None and result["not_serving_after_s"] <= 5
    assert result["new_call_code"] == "UNAVAILABLE"
    assert result["exit_code"] == 1 and result["processes_left"] == []


@pytest.fixture(scope="session")
def default_detection():
    """(checkpoint, report) for the embedded default model, detected afresh (not from the cache)."""
    from superweights.compression.pipeline import detect

    return detect(None, use_cache=False, progress=False)


# -- real servers on loopback ----------------------------------------------------------------------------------
def start_server(log: Path, *extra: str, token: str | None = None, tls: dict | None = None) -> common.Server:
    """A test server: reliability.common.start_server with TEST_FLAGS first (a later repeat of a flag wins)."""
    return common.start_server(log, *TEST_FLAGS, *extra, token=token, tls=tls)


@contextlib.contextmanager
def serving(running: dict[str, common.Server]):
    """Servers started together (their engines start in parallel), SERVING on entry, stopped on exit."""
    try:
        for server in running.values():
            wait_serving(server)
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory, default_detection):
    """Two real servers on the default model: "auth" (one process; bearer tokens, plaintext, reflection; an engine
    core SIGKILL ends it, last) and "tls" (two front ends on one engine core, each with half of --max-concurrent 4
    and --max-queue 4; mutual TLS: reliability.certs' CA, server and client certificates, and a rogue client; no
    auth, no reflection, no canary, at most 2 scaled variants, a 60 s grace; test_reliability's SIGTERM test ends
    it). `default_detection` first, so that both start from the verified report it cached."""
    directory = tmp_path_factory.mktemp("servers")
    certificates = make_mtls(directory / "certs")
    with serving({"auth": start_server(directory / "auth.log", token=TOKEN),
                  "tls": start_server(directory / "tls.log", *locked_down_flags(cap=2), *TLS_FLAGS,
                                      tls=certificates)}) as running:
        yield running
