"""The one codegen: proto/**/*.proto -> OUT/superweights/v1/ (the generated Python, never edited by hand, never
committed). scripts/codegen.sh runs it on the checkout; setup.py runs it in every build, so an sdist or a wheel
made from a clean tree holds the code.

    python scripts/codegen.py [OUT]        OUT: the repository root by default
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PACKAGE = Path("superweights") / "v1"


def generate(out: Path) -> Path:
    """Write the messages, their stubs and type hints under `out`; returns out/superweights/v1."""
    from grpc_tools import protoc

    target = Path(out) / PACKAGE
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    flags = [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(["grpc_tools.protoc", f"-I{PROTO}", *flags, *protos]) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(protos)}")
    for directory in [target, *(d for d in target.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    return target


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
