"""A server's scratch directories name their owner, and a server starting removes those of owners that are gone
(a server killed with SIGKILL cannot remove its own): real processes, a private temporary root."""

import os
import subprocess
import sys

from superweights.server.scratch import OWNER, make_scratch_dir, sweep

PREFIX = "superweights-adapters-"


def test_a_dead_owners_directory_is_swept_and_a_live_ones_kept(tmp_path):
    # a directory made by a process that then exited, as a SIGKILLed server leaves it
    code = (f"import sys; sys.path[:0] = {sys.path!r}; from superweights.server.scratch import make_scratch_dir; "
            f"from pathlib import Path; print(make_scratch_dir({PREFIX!r}, Path({str(tmp_path)!r})))")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isdir(dead) and os.path.isfile(os.path.join(dead, OWNER))
    unowned = tmp_path / f"{PREFIX}older"  # no owner named: another server starting, or an older one's
    unowned.mkdir()
    other = tmp_path / "superweights-run-x"  # another prefix: not this sweep's
    other.mkdir()
    (other / OWNER).write_text("1 0 pid:[1]")
    elsewhere = tmp_path / f"{PREFIX}container"  # another pid namespace's (a container sharing /tmp): its pids
    elsewhere.mkdir()  # mean nothing here
    (elsewhere / OWNER).write_text("999999 1 pid:[1]")

    mine = make_scratch_dir(PREFIX, tmp_path)

    assert not os.path.exists(dead)
    assert mine.is_dir() and (mine / OWNER).read_text().split()[0] == str(os.getpid())
    assert unowned.is_dir() and other.is_dir() and elsewhere.is_dir()
    assert sweep(PREFIX, tmp_path) == []  # this process is alive: its directory stays


def test_a_reused_pid_does_not_keep_a_directory(tmp_path):
    """The pid alone could be a later process's: the owner's start time must match too."""
    stale = tmp_path / f"{PREFIX}stale"
    stale.mkdir()
    namespace = os.readlink("/proc/self/ns/pid")
    (stale / OWNER).write_text(f"{os.getpid()} 1 {namespace}")  # this pid, another start time
    assert sweep(PREFIX, tmp_path) == [stale] and not stale.exists()
