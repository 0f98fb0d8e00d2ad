"""Shared fixtures: the real default model's verified report, computed once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUPERWEIGHTS = str(Path(sys.executable).parent / "superweights")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([SUPERWEIGHTS, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def default_detection():
    """(checkpoint, report) for the embedded default model, detected afresh (not from the cache)."""
    from compression.pipeline import detect

    return detect(None, use_cache=False, progress=False)
