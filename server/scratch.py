"""A server's scratch directories in the temporary directory (its adapters, its front ends' metrics). Each names its
owner process in a file, and a server that makes one first removes those whose owner is gone: a server killed with
SIGKILL, or by the kernel's OOM killer, cannot remove its own. A directory that names no owner is left alone (a
server starting right now, or one from before owners were named)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
OWNER = ".owner"  # "<pid> <start time> <pid namespace>": the pid alone could be a later process's, or another
# container's that shares this temporary directory (its pids mean nothing here: its directories are left alone)


def _start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if it is gone or
    there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces: field 3 onwards


def _owner() -> tuple[str, str, str] | None:
    """This process as an owner file names it (pid, start time, pid namespace); None where /proc does not tell."""
    started = _start_time(os.getpid())
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None
    return (str(os.getpid()), started, namespace) if started is not None else None


def sweep(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove the directories `root`/`prefix`* whose named owner, a process of this pid namespace, has exited;
    returns them."""
    me = _owner()
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{prefix}*") if me else ():
        try:
            pid, started, namespace = (path / OWNER).read_text().split()
            gone = namespace == me[2] and _start_time(int(pid)) != started
        except (OSError, ValueError):
            continue
        if gone:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d scratch directories of servers that exited without cleaning up: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def make_scratch_dir(prefix: str, root: Path | None = None) -> Path:
    """A new private directory `root`/`prefix`<random> owned by this process, after sweeping the ones of exited
    owners (only where /proc tells when a process started)."""
    sweep(prefix, root)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    me = _owner()
    if me is not None:
        (path / OWNER).write_text(" ".join(me))
    return path
