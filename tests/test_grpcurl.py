"""The grpcurl lines of clients/README.md (section "grpcurl"), run as written against the real server with auth on,
through reflection."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.tools import ROOT, grpcurl

pytestmark = pytest.mark.slow

README_TARGET = "127.0.0.1:50051"


def readme_grpcurl_lines() -> list[str]:
    """The grpcurl commands in the code blocks of clients/README.md's section "grpcurl", continuation lines joined."""
    section = (ROOT / "clients" / "README.md").read_text().split("\n## grpcurl\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [c for c in commands if c.startswith("grpcurl ")]


def messages(stdout: str) -> list[dict]:
    """grpcurl prints each message as a JSON object (proto field names), one after another."""
    decoder, found, text, at = json.JSONDecoder(), [], stdout.strip(), 0
    while at < len(text):
        message, at = decoder.raw_decode(text, at)
        found.append(message)
        at = len(text) - len(text[at:].lstrip())
    return found


@pytest.fixture(scope="module")
def run_readme(servers):
    env = dict(os.environ, TOKEN=TOKEN, PATH=f"{Path(grpcurl()).parent}{os.pathsep}{os.environ['PATH']}")

    def run(command: str) -> str:
        done = subprocess.run(["bash", "-c", command.replace(README_TARGET, servers["auth"].target)], check=False,
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        return done.stdout

    return run


def test_readme_has_the_grpcurl_examples():
    lines = readme_grpcurl_lines()
    assert [line.split()[-1] for line in lines] == \
        ["list", "superweights.v1.SuperWeightService/GetModelInfo", "superweights.v1.SuperWeightService/Generate"]


def test_readme_grpcurl_list(run_readme):
    services = run_readme(readme_grpcurl_lines()[0]).split()
    assert "superweights.v1.SuperWeightService" in services and "grpc.health.v1.Health" in services


def test_readme_grpcurl_get_model_info(run_readme):
    (info,) = messages(run_readme(readme_grpcurl_lines()[1]))
    assert info["model_name"] == "SmolLM2-135M-Instruct" and "no_super_weights" in info["variants"]


def test_readme_grpcurl_generate(run_readme):
    stream = messages(run_readme(readme_grpcurl_lines()[2]))
    assert len(stream) > 1 and "Paris" in "".join(m.get("text", "") for m in stream)
    assert stream[-1]["finish_reason"] in ("length", "stop") and stream[-1]["completion_tokens"] <= 8
