"""R4: faults. The engine core killed (SIGKILL) under load; SIGTERM under load; a truncated or altered model in
the cache; two processes preparing the same model at once; a read-only or full cache directory.

    flock /tmp/engine.lock python -m reliability.faults
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from .common import (
    LOGS,
    REPO,
    RESULTS,
    SUPERWEIGHTS,
    adapter_files,
    channel,
    code_name,
    engine_core,
    engine_processes,
    front_end_processes,
    health,
    metadata,
    metric_values,
    request_class,
    rpc,
    served,
    write_result,
)

# -- the engine and the process under load ---------------------------------------------------------------------
KILL_ARMS = ("base", "no_super_weights")  # a compare's arms, with one scaled arm (alpha 2): three requests


class InFlight:
    """Calls running in threads: Generate streams (optionally read to the end) and CompareGenerations."""

    def __init__(self, server):
        self.server = server
        self.channel = channel(server)
        self.calls: list[dict] = []
        self._threads: list[threading.Thread] = []

    def stream(self, max_tokens: int, prompt: str = "Tell me a long story.") -> dict:
        call = {"method": "Generate", "messages": 0, "tokens": 0, "code": None, "finish_reason": "",
                "first": threading.Event(), "ended_at": None}
        request = request_class("Generate")(text=prompt, sampling={"max_tokens": max_tokens, "ignore_eos": True,
                                                                   "temperature": 0.0})

        def run() -> None:
            try:
                for message in rpc(self.channel, "Generate")(request, metadata=metadata(self.server), timeout=300):
                    call["messages"] += 1
                    call["tokens"] += len(message.token_ids)
                    call["finish_reason"] = message.finish_reason or call["finish_reason"]
                    call["first"].set()
                call["code"] = "OK"
            except grpc.RpcError as e:
                call["code"], call["details"] = code_name(e), e.details()
            call["ended_at"] = time.monotonic()
            call["first"].set()

        return self._start(call, run)

    def compare(self, max_tokens: int = 300) -> dict:
        """A compare of KILL_ARMS and alpha 2 ("first" is set once it is sent: a unary call shows no progress)."""
        call = {"method": "CompareGenerations", "code": None, "first": threading.Event(), "ended_at": None}
        request = request_class("CompareGenerations")(text="The capital of France is", variants=list(KILL_ARMS),
                                                      alphas=[2.0], sampling={"max_tokens": max_tokens,
                                                                              "ignore_eos": True, "temperature": 0.0})

        def run() -> None:
            call["first"].set()
            try:
                rpc(self.channel, "CompareGenerations")(request, metadata=metadata(self.server), timeout=300)
                call["code"] = "OK"
            except grpc.RpcError as e:
                call["code"], call["details"] = code_name(e), e.details()
            call["ended_at"] = time.monotonic()

        return self._start(call, run)

    def _start(self, call: dict, run) -> dict:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)
        self.calls.append(call)
        return call

    def join(self, timeout: float) -> int:
        """Wait for every call; the number still running (hung) after `timeout`."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def close(self) -> None:
        self.channel.close()


def _health_or_gone(server) -> str:
    try:
        return health(server, timeout=2)
    except grpc.RpcError as e:
        return f"RPC {code_name(e)}"  # the process has closed its port: as good as NOT_SERVING to a prober


def _not_serving_since(server, since: float, timeout: float = 30) -> tuple[float, str] | None:
    """(seconds from `since` until health stopped saying SERVING, what it said), polled every 50 ms; None if it
    still said SERVING after `timeout`."""
    while time.monotonic() - since < timeout:
        status = _health_or_gone(server)
        if status != "SERVING":
            return time.monotonic() - since, status
        time.sleep(0.05)
    return None


def _new_call(server, timeout: float = 10) -> str:
    """The code of a new two-token Generate, or "HUNG" if it has not ended `timeout` + 20 s later. The wait is
    bounded here, not only by the call's deadline: once, in a test run, a call to a server whose engine core had
    just been killed outlived its 10 s deadline by 14 minutes inside grpc (the channel's poller never delivered
    its end), and the test waited with it."""
    result = {"code": "HUNG"}

    def call() -> None:
        try:
            with channel(server) as ch:
                list(rpc(ch, "Generate")(request_class("Generate")(text="hi", sampling={"max_tokens": 2}),
                                         metadata=metadata(server), timeout=timeout))
            result["code"] = "OK"
        except grpc.RpcError as e:
            result["code"] = code_name(e)

    thread = threading.Thread(target=call, daemon=True)  # a hung one is left behind, not waited for
    thread.start()
    thread.join(timeout + 20)
    return result["code"]


def _leftovers(pids: list[int], wait: float = 15) -> list[int]:
    """The processes still running `wait` seconds after the front end exited (its children go on their own)."""
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + wait
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def _all_inside_engine(server, load: InFlight, streams: int, compares: int, timeout: float) -> bool:
    """Until every stream has had its first message and every compare is inside the engine: no call queued for a
    slot, and the engine holding a request for every stream and every arm. False if that never happens."""
    deadline = time.monotonic() + timeout
    arms = compares * (len(KILL_ARMS) + 1)
    while time.monotonic() < deadline:
        if all(c["first"].is_set() for c in load.calls if c["method"] == "Generate"):
            queued = sum(metric_values(server, "superweights_requests_queued").values())
            comparing = metric_values(server, "superweights_requests_in_flight").get(
                (("method", "CompareGenerations"),), 0)
            engine = sum(metric_values(server, "superweights_engine_unfinished_requests").values())
            if queued == 0 and comparing == compares and engine >= streams + arms:
                return True
        if any(c["ended_at"] is not None for c in load.calls):
            return False  # a call ended (refused, or too short): the kill would not find it in flight
        time.sleep(0.05)
    return False


def engine_kill_under_load(server, streams: int = 6, compares: int = 2, max_tokens: int = 1000,
                           exit_timeout: float = 120) -> dict:
    """SIGKILL the engine core while calls run: health NOT_SERVING within 5 s, every in-flight call ends
    UNAVAILABLE (none hangs), new calls refused, the process exits non-zero, nothing left running.

    Every call is in flight at the kill: long generations (end of sequence ignored), and the kill only once each
    stream has had its first message and each compare is inside the engine (`_all_inside_engine`); the server
    must admit them all at once (--max-concurrent >= streams + compares) and run no canary. `ended_before_kill`
    counts the calls that did not wait for it (0, or the run says nothing)."""
    load = InFlight(server)
    try:
        for _ in range(streams):
            load.stream(max_tokens)
        for _ in range(compares):
            load.compare(max_tokens)
        inside = _all_inside_engine(server, load, streams, compares, timeout=120)
        core = engine_core(server)
        descendants = [p.pid for p in engine_processes(server)]
        killed_at = time.monotonic()
        os.kill(core.pid, signal.SIGKILL)
        not_serving = _not_serving_since(server, killed_at)
        new_call = _new_call(server)
        hung = load.join(60)
        try:
            exit_code = server.process.wait(exit_timeout)
        except subprocess.TimeoutExpired:
            exit_code = None
        exited_after = time.monotonic() - killed_at
        calls = [{"method": c["method"], "code": c["code"], "details": c.get("details", "")[:200],
                  "ended_after_kill_s": None if c["ended_at"] is None else round(c["ended_at"] - killed_at, 2)}
                 for c in load.calls]
    finally:
        load.close()
    return {"in_flight": len(calls), "all_inside_engine_at_kill": inside, "max_tokens": max_tokens,
            "ended_before_kill": sum(c["ended_after_kill_s"] is not None and c["ended_after_kill_s"] < 0
                                     for c in calls),
            "calls": calls, "codes": sorted({c["code"] or "HUNG" for c in calls}), "hung": hung,
            "not_serving_after_s": None if not_serving is None else round(not_serving[0], 2),
            "health_seen": None if not_serving is None else not_serving[1],
            "new_call_code": new_call, "exit_code": exit_code, "exited_after_s": round(exited_after, 1),
            "processes_left": _leftovers(descendants)}


def front_end_kill(server, exit_timeout: float = 120) -> dict:
    """SIGKILL one front end of a server of several: the server stops saying SERVING (the survivors drain), exits
    non-zero for an orchestrator to restart it, and leaves no process: never a port that is half served."""
    front_ends = front_end_processes(server)
    descendants = [p.pid for p in engine_processes(server)]
    victim = front_ends[-1]
    killed_at = time.monotonic()
    victim.kill()
    not_serving = _not_serving_since(server, killed_at)
    try:
        exit_code = server.process.wait(exit_timeout)
    except subprocess.TimeoutExpired:
        exit_code = None
    return {"front_ends": len(front_ends), "killed": victim.pid, "exit_code": exit_code,
            "not_serving_after_s": None if not_serving is None else round(not_serving[0], 2),
            "health_seen": None if not_serving is None else not_serving[1],
            "exited_after_s": round(time.monotonic() - killed_at, 1), "processes_left": _leftovers(descendants)}


def engine_kill_during_compares(server, callers: int = 2, run_for: float = 8.0) -> dict:
    """Compares of a long prompt and one token in a loop (so about half their time is the teacher-forced
    scoring), the engine core killed meanwhile: the code each caller's last call ended with."""
    Compare = request_class("CompareGenerations")
    request = Compare(text="Call me Ishmael. " * 300, variants=["base", "no_super_weights"],
                      sampling={"max_tokens": 1, "temperature": 0.0})
    stop = threading.Event()
    last: list[str] = []

    def caller() -> None:
        code = "NONE"
        with channel(server) as ch:
            while not stop.is_set():
                try:
                    rpc(ch, "CompareGenerations")(request, metadata=metadata(server), timeout=120)
                    code = "OK"
                except grpc.RpcError as e:
                    code = f"{code_name(e)}: {(e.details() or '')[:120]}"
                    if code_name(e) != "RESOURCE_EXHAUSTED":
                        break
        last.append(code)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    time.sleep(run_for)
    os.kill(engine_core(server).pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    stop.set()
    try:
        exit_code = server.process.wait(120)
    except subprocess.TimeoutExpired:
        exit_code = None
    return {"callers": callers, "last_codes": last, "exit_code": exit_code}


def sigterm_under_load(server, running: int = 2, queued: int = 2, max_tokens: int = 48,
                       exit_timeout: float = 120) -> dict:
    """SIGTERM while `running` streams run and `queued` wait for a slot (the server's --max-concurrent and
    --max-queue): every admitted stream completes, new calls are refused, the process exits 0 in its grace."""
    load = InFlight(server)
    try:
        for _ in range(running + queued):
            load.stream(max_tokens)
            time.sleep(0.2)
        deadline = time.monotonic() + 120
        while sum(c["first"].is_set() for c in load.calls) < running and time.monotonic() < deadline:
            time.sleep(0.1)
        queued_seen = sum(metric_values(server, "superweights_requests_queued").values())
        termed_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        new_call = _new_call(server)
        status = _health_or_gone(server)
        hung = load.join(exit_timeout)
        try:
            exit_code = server.process.wait(exit_timeout)
        except subprocess.TimeoutExpired:
            exit_code = None
        calls = [{"code": c["code"], "tokens": c["tokens"], "finish_reason": c["finish_reason"]} for c in load.calls]
    finally:
        load.close()
    return {"admitted": len(calls), "queued_at_sigterm": queued_seen, "calls": calls, "hung": hung,
            "completed": sum(c["code"] == "OK" and c["tokens"] == max_tokens and c["finish_reason"] == "length"
                             for c in calls),
            "new_call_code": new_call, "health_after_sigterm": status, "exit_code": exit_code,
            "exited_after_s": round(time.monotonic() - termed_at, 1)}


# -- the model cache -------------------------------------------------------------------------------------------
def real_cache() -> Path:
    from superweights.compression.models import cache_dir

    return cache_dir()


def default_checkpoint() -> Path:
    from superweights.compression.models import resolve_checkpoint

    return Path(resolve_checkpoint(None).path)


def copy_cache(target: Path, model: bool = True) -> Path:
    """A private cache with the default model's GGUF (and its converted checkpoint): never touch the real one."""
    from superweights.compression.models import DEFAULT_GGUF_MEMBER

    gguf = real_cache() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    (target / "downloads").mkdir(parents=True, exist_ok=True)
    shutil.copy2(gguf, target / "downloads" / gguf.name)
    if model:
        checkpoint = default_checkpoint()
        shutil.copytree(checkpoint, target / "models" / checkpoint.name)
    return target


def prepare(cache: Path, timeout: float = 600) -> dict:
    """`superweights model prepare` on a cache: exit code, the sha256 it reports, its last stderr line."""
    env = dict(os.environ, SUPERWEIGHTS_CACHE=str(cache), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    done = subprocess.run([SUPERWEIGHTS, "model", "prepare"], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    sha = done.stdout.rsplit("sha256 ", 1)[-1].strip(" )\n") if "sha256" in done.stdout else None
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    return {"exit_code": done.returncode, "sha256_16": sha, "seconds": round(time.monotonic() - start, 1),
            "converted": "converting" in done.stderr, "traceback": "Traceback" in done.stderr,
            "last_error_line": errors[-1][:300] if errors else ""}


def cache_corruption(workdir: Path) -> dict:
    """A cached checkpoint truncated, then altered in place (size and mtime kept): is it detected and rebuilt?"""
    cache = copy_cache(workdir / "cache")
    (checkpoint,) = [p for p in (cache / "models").iterdir() if p.is_dir()]
    weights = checkpoint / "model.safetensors"
    good = prepare(cache)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    truncated = prepare(cache)
    truncated["rebuilt"] = weights.stat().st_size == size
    shutil.rmtree(checkpoint)
    shutil.copytree(default_checkpoint(), checkpoint)
    prepare(cache)  # memoises the good checkpoint's hash by size and mtime
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    altered = prepare(cache)
    return {"reference_sha256_16": good["sha256_16"], "truncated": truncated, "altered": altered,
            "truncated_detected": truncated["converted"] and truncated["sha256_16"] == good["sha256_16"],
            "altered_detected": altered["converted"] and altered["sha256_16"] == good["sha256_16"]}


def concurrent_prepare(workdir: Path) -> dict:
    """Two `superweights model prepare` at once on a cache holding only the GGUF: how many convert, and does a
    watcher ever see the checkpoint directory half-written?"""
    cache = copy_cache(workdir / "cache", model=False)
    models = cache / "models"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            for d in models.glob("*") if models.exists() else ():
                if d.name.startswith("."):
                    continue  # the private temporary directory of a conversion
                files = {p.name for p in d.iterdir()} if d.is_dir() else set()
                if not {"config.json", "model.safetensors", "tokenizer.json"} <= files:
                    seen.append(f"{d.name}: {sorted(files)}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results: list[dict] = [{}, {}]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, prepare(cache))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    return {"processes": results, "conversions": sum(r["converted"] for r in results),
            "both_succeeded": all(r["exit_code"] == 0 for r in results),
            "same_checkpoint": results[0]["sha256_16"] == results[1]["sha256_16"],
            "half_written_seen": seen[:5], "leftover_temp_dirs": sorted(p.name for p in models.glob(".*"))}


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs (root only): a full disk, or with read_only a cache that cannot be written."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def read_only_populated(workdir: Path) -> dict:
    """A cache that holds everything but cannot be written (a read-only bind mount of a full copy)."""
    cache = copy_cache(workdir / "ro-source")
    target = workdir / "ro"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(cache), str(target)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True, capture_output=True)
        return prepare(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def cache_directory_faults(workdir: Path, full: bool = True) -> dict:
    """An empty read-only cache, a populated read-only one, and (full=True, about a minute) a disk that fills
    up during the conversion."""
    out = {}
    with mounted_tmpfs(workdir / "empty-ro", "1m", read_only=True) as cache:
        out["read_only_empty"] = prepare(cache / "cache")
    out["read_only_populated"] = read_only_populated(workdir)
    if full:
        from superweights.compression.models import DEFAULT_GGUF_MEMBER

        gguf_bytes = (real_cache() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name).stat().st_size
        with mounted_tmpfs(workdir / "full", f"{gguf_bytes // 2**20 + 40}m") as cache:
            copy_cache(cache, model=False)
            out["disk_full_during_conversion"] = prepare(cache)
    for case in out.values():
        case["clear"] = case["exit_code"] == 0 or (case["exit_code"] == 2 and not case["traceback"])
    return out


def can_mount() -> bool:
    with tempfile.TemporaryDirectory() as d:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True)
        if done.returncode == 0:
            subprocess.run(["umount", d], capture_output=True)
        return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, default=LOGS)
    parser.add_argument("--only", choices=("engine", "cache"), help="one half; the other half's results are kept "
                        "from the last run (cache needs no engine, so no lock)")
    args = parser.parse_args()
    previous = RESULTS / "faults.json"
    result: dict = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    for key in ("campaign", "date", "command", "commit", "machine"):
        result.pop(key, None)
    runs = result.setdefault("runs", {})  # part: when and how it was last measured
    stamp = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "command": "python -m reliability.faults " + " ".join(sys.argv[1:])}
    runs.update({part: stamp for part in ("engine", "cache") if args.only in (None, part)})
    if args.only != "cache":
        before = adapter_files()
        with served(args.logs / "faults-kill.log", "--canary-interval", "0") as server:
            result["kill_server_start_s"] = round(server.start_seconds, 1)
            result["engine_sigkill_under_load"] = engine_kill_under_load(server)
        result["engine_sigkill_under_load"]["adapter_dirs_left"] = sorted(set(adapter_files()) - set(before))
        with served(args.logs / "faults-compare.log", "--canary-interval", "0") as server:
            result["engine_sigkill_during_compares"] = engine_kill_during_compares(server)
        with served(args.logs / "faults-term.log", "--canary-interval", "0", "--max-concurrent", "2",
                    "--max-queue", "2", "--grace", "60") as server:
            result["sigterm_under_load"] = sigterm_under_load(server)
    if args.only == "engine":
        print(write_result("faults", result))
        return 0
    with tempfile.TemporaryDirectory(prefix="superweights-faults-") as tmp:
        work = Path(tmp)
        result["cache_corruption"] = cache_corruption(work / "corrupt")
        shutil.rmtree(work / "corrupt")
        result["concurrent_prepare"] = concurrent_prepare(work / "concurrent")
        shutil.rmtree(work / "concurrent")
        result["cache_directory"] = cache_directory_faults(work) if can_mount() else "skipped: cannot mount"
    print(json.dumps(result, indent=2, default=str)[:4000])
    print(write_result("faults", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
