"""One device call, as the device scripts run it: a time budget that skips what would not finish, each
configuration that needs the GPU to itself in a child process of its own (its memory is gone before the next
starts), and the results file saved after each entry, so that a call cut off at its limit still returns what ran.
Also the command-line options every device script takes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.gpu_env import device_facts, register_plugin
from benchmarks.served_model import Model, add_model_options, model_from
from benchmarks.servers import server_env

FIRST_ENTRY_ESTIMATE_S = 170.0  # an 8B server arm: start (compile + CUDA graphs), the levels, stop
TOKENS = 128  # greedy tokens per request


class Budget:
    """Seconds left in the device call; an entry starts only if it fits. The first entry compiles the graphs that
    later entries of the same shape load from vLLM's cache, so once two ran, the slowest after the first is the
    estimate; before that, the first one's time (or a guess)."""

    def __init__(self, seconds: float, first_estimate: float = FIRST_ENTRY_ESTIMATE_S, margin: float = 15.0):
        self.start, self.seconds, self.estimate, self.margin = time.monotonic(), seconds, first_estimate, margin
        self.durations: list[float] = []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def fits(self) -> bool:
        known = self.durations[1:] or self.durations or [self.estimate]
        return self.left() >= max(known) + self.margin

    def record(self, seconds: float) -> None:
        self.durations.append(seconds)


def save_json(path: Path, results: dict) -> None:
    """Written whole or not at all (a call cut off mid-write keeps the last complete file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def exception_lines(text: str, most: int = 4) -> str:
    """The distinct 'SomethingError: message' of a log's lines, first ones first (the root cause), whatever the
    prefix vLLM's processes put before them ("(EngineCore pid=1) ERROR ... [core.py:1] ValueError: ...")."""
    import re

    found = []
    for line in text.splitlines():
        match = re.search(r"\b(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception)\b: .*", line)
        if match and match.group(0)[:400] not in found:
            found.append(match.group(0)[:400])
    return " | ".join(found[:most]) or text[-800:]


def run_child(module: str, args: list[str], timeout: float, log: Path) -> dict:
    """`python -m MODULE <args> --result FILE`: what it wrote to FILE. Its output goes to `log`; a failure is
    recorded with the exception lines found there (vLLM's root cause comes before its final RuntimeError)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"benchmark-child-{os.getpid()}-{time.monotonic_ns()}.json"
    with open(log, "w") as sink:
        try:
            proc = subprocess.run([sys.executable, "-m", module, *args, "--result", str(out)], timeout=timeout,
                                  stdout=sink, stderr=subprocess.STDOUT, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s; see {log.name}"}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}; see {log.name}: {exception_lines(log.read_text(errors='replace'))}"}
    return json.loads(out.read_text())


def write_child_result(path: Path, compute: Callable[[], dict]) -> None:
    """A child process's end: the plugin registered, then compute()'s result as JSON where the parent reads it."""
    register_plugin()
    path.write_text(json.dumps(compute()))


def arm_env() -> dict:
    """The servers' environment (benchmarks.servers.SERVER_ENV) set for this process and every child it starts;
    returns it."""
    env = server_env()
    os.environ.update(env)
    return env


class DeviceCall:
    """The results of one device call in OUT/<name>, saved after every entry; server logs and child logs in
    OUT/logs; what does not fit `budget_s` is skipped and says so."""

    def __init__(self, out: Path, name: str, budget_s: float, first_estimate: float = FIRST_ENTRY_ESTIMATE_S):
        self.path, self.logs = out / name, out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.budget = Budget(budget_s, first_estimate)

    def facts(self, model: Model) -> dict:
        """What every result file starts with: the device, the plugin's registration, the servers' environment
        and the declared super weights."""
        return {**device_facts(), "plugin": register_plugin(), "env": arm_env(), "super_weights": model.declared}

    def child(self, module: str, args: list[str], log_name: str, reserve_s: float = 0) -> dict:
        """run_child with what is left of the budget, less `reserve_s` kept for what comes after it."""
        return run_child(module, args, timeout=max(self.budget.left() - reserve_s, 1), log=self.logs / log_name)

    def in_turn(self, names: Iterable[str], key: str, results: dict, entries: list,
                measure: Callable[[str, dict, Callable], None]) -> None:
        """measure(name, entry, saved) for each name that fits the budget, in order, the others recorded as
        skipped; `results` (which holds `entries`) saved after each, and whenever measure calls saved()."""
        def saved(_=None) -> None:
            save_json(self.path, results)

        saved()
        for name in names:
            entry = {key: name}
            entries.append(entry)
            if not self.budget.fits():
                entry["skipped"] = f"{self.budget.left():.0f} s left in the call's budget"
                saved()
                continue
            t0 = time.monotonic()
            measure(name, entry, saved)
            entry["wall_seconds"] = time.monotonic() - t0
            self.budget.record(entry["wall_seconds"])
            saved()
            print(json.dumps({k: entry.get(k) for k in (key, "startup_seconds", "wall_seconds", "error")}), flush=True)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every device call takes: the model, where the JSON goes, output length, the time budget."""
    add_model_options(p)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    p.add_argument("--tokens", type=int, default=TOKENS, help="greedy tokens per request (%(default)s)")
    p.add_argument("--budget-s", type=float, default=530, help="what would end later is skipped (%(default)s)")


def device_parser(doc: str, run_help: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction,
                                                     argparse.ArgumentParser]:
    """(the parser, its subcommands, the `run` subcommand with add_run_options) of a device script."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help=run_help)
    add_run_options(run)
    return parser, sub, run


def child_parser(sub: argparse._SubParsersAction, name: str, what: str) -> argparse.ArgumentParser:
    """A subcommand the device call runs as a child process: the model's options and --result."""
    child = sub.add_parser(name, help=f"(child) {what}")
    add_model_options(child)
    child.add_argument("--result", type=Path, required=True)
    return child


def dispatch(args: argparse.Namespace, run: Callable[[Model, argparse.Namespace], dict],
             children: dict[str, Callable[[Model, argparse.Namespace], dict]]) -> None:
    """`run` for the run subcommand; a child subcommand's function, its result written for the parent."""
    model = model_from(args)
    if args.what == "run":
        run(model, args)
    else:
        write_child_result(args.result, lambda: children[args.what](model, args))
