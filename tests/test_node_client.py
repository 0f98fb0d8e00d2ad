"""The Node.js client (clients/node: @grpc/grpc-js, the .proto loaded at run time) against the real test servers,
agreeing with the Python client."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import TOKEN
from tests.tools import NODE_CLIENT, node

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
ENV = {k: v for k, v in os.environ.items() if k != "SUPERWEIGHTS_TOKEN"}  # the CLI's fallback for --token


def run_node(server, *args: str, token: str | None = TOKEN, certificate: bool = True) -> subprocess.CompletedProcess:
    """The Node CLI against a test server: its CA when it has TLS, and (certificate=True) the client certificate
    when it asks for one (mutual TLS)."""
    options = ["--target", server.target, "--timeout", "120"]
    options += ["--token", token] if token else []
    tls = server.tls or {}
    options += ["--tls-ca", str(tls["ca"])] if tls else []
    if certificate and tls.get("client_cert"):
        options += ["--tls-cert", str(tls["client_cert"]), "--tls-key", str(tls["client_key"])]
    return subprocess.run([node(), str(NODE_CLIENT / "cli.js"), *options, *args], check=False, capture_output=True,
                          text=True, timeout=180, env=ENV)


def node_json(server, *args: str) -> dict:
    done = run_node(server, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def auth(servers):
    return servers["auth"]


def test_node_streams_a_generation(auth):
    done = run_node(auth, "generate", PROMPT, "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert re.search(r"^\[(length|stop): \d+ prompt \+ \d+ generated tokens\]$", done.stderr, re.MULTILINE), done.stderr


def test_node_generation_equals_the_python_clients(auth):
    streamed = node_json(auth, "generate", PROMPT, "--max-tokens", "8")
    with auth.client() as client:
        expected = client.generate(PROMPT, max_tokens=8, temperature=0.0)
    assert streamed["messages"] > 1 and streamed["completion_tokens"] == len(streamed["token_ids"])
    assert streamed["token_ids"] == expected["token_ids"] and streamed["text"] == expected["text"]


def test_node_reads_the_super_weights(auth):
    report = node_json(auth, "super-weights")
    with auth.client() as client:
        expected = client.super_weights()
    assert [(w["layer"], w["module"], w["row"], w["col"]) for w in report["super_weights"]] == \
        [(w.layer, w.module, w.row, w.col) for w in expected.super_weights]
    assert [w["value"] for w in report["super_weights"]] == pytest.approx([w.value for w in expected.super_weights])
    listed = run_node(auth, "super-weights")
    assert listed.returncode == 0, listed.stderr
    for w in expected.super_weights:
        assert f"layer {w.layer}  row {w.row}  col {w.col}" in listed.stdout


def test_node_compare_runs_the_base_and_removal_arms(auth):
    response = node_json(auth, "compare", PROMPT, "--max-tokens", "8")
    arms = {arm["variant"]: arm for arm in response["arms"]}
    assert list(arms) == ["base", "no_super_weights"]
    assert "Paris" in arms["base"]["text"] and "Paris" not in arms["no_super_weights"]["text"]
    (divergence,) = response["divergence"]
    assert divergence["variant"] == "no_super_weights" and divergence["first_differing_token"] == 0


def test_node_needs_the_bearer_token(auth):
    missing = run_node(auth, "info", token=None)
    wrong = run_node(auth, "info", token="not-the-token")
    assert missing.returncode == 1 and "error: UNAUTHENTICATED" in missing.stderr, missing.stderr
    assert wrong.returncode == 1 and "error: PERMISSION_DENIED" in wrong.stderr, wrong.stderr


def test_node_over_mutual_tls(servers):
    """servers["tls"] asks for a client certificate: with one the Node client is served, without one the
    handshake fails."""
    info = node_json(servers["tls"], "info")
    assert info["model_name"] == "SmolLM2-135M-Instruct" and "no_super_weights" in info["variants"]
    refused = run_node(servers["tls"], "info", token=None, certificate=False)
    assert refused.returncode == 1 and "error: UNAVAILABLE" in refused.stderr, refused.stderr
