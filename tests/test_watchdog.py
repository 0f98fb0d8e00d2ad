"""The suite's watchdog (tests/conftest.py): a test that hangs ends the run with its name and every thread's
stack, instead of CI waiting out its own limit, and the processes it started (servers) go with it."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def test_a_hung_test_ends_the_run_with_its_stacks(tmp_path):
    (tmp_path / "test_hangs.py").write_text(
        "import subprocess, time\n\ndef test_waits_forever(tmp_path):\n"
        "    child = subprocess.Popen(['sleep', '600'])\n"
        f"    open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(600)\n")
    env = dict(os.environ, SUPERWEIGHTS_TEST_HUNG_AFTER_S="2", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_hangs.py")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1
    assert "test_hangs.py::test_waits_forever has run for more than 2 s: hung" in done.stderr
    assert 'test_hangs.py", line 6 in test_waits_forever' in done.stderr, done.stderr[-2000:]
    pid = int((tmp_path / "child.pid").read_text())
    with contextlib.suppress(psutil.NoSuchProcess):  # killed with the run; once init has reaped it, gone
        psutil.Process(pid).wait(10)
    assert not psutil.pid_exists(pid)
