"""Directories that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory next to `target`; when the block succeeds it replaces `target` (whatever was there),
    when it raises it is removed and `target` stays as it was.

        with replacing_dir(out) as tmp:
            (tmp / "config.json").write_text(...)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    old = tmp.with_name(f"{tmp.name}.old")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if target.exists():
            os.replace(target, old)  # os.replace cannot put a directory over a non-empty one: move it aside first
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file that readers see whole or not at all (a temporary file beside it, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
