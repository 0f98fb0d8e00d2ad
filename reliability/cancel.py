"""R2: a cancellation storm. Calls are cancelled at random points: before the first token, mid-stream, inside a
compare, by their deadline, and by their client process being killed (SIGKILL, so the connection just drops).
Afterwards the engine holds no unfinished request within 1 s of the last cancel, no adapter, open file, fd or
asyncio task is left over (the server's idle task count is the same as before), and a greedy golden generation is
identical to the one before.

    flock /tmp/engine.lock python -m reliability.cancel --calls 1000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from .common import (
    adapter_files,
    campaign,
    campaign_parser,
    channel,
    code_name,
    engine_processes,
    golden,
    idle_asyncio_tasks,
    metadata,
    request_class,
    rpc,
    unfinished,
)

KINDS = ("before_first_token", "mid_stream", "compare", "deadline", "client_killed")
LONG = 400  # max_tokens of every cancelled call: none of them can finish before it is cancelled
STREAMS_PER_CHILD = 4


def _generate(prompt: str = "Tell me a long story about a lighthouse keeper.", logprobs: int = 0):
    Generate = request_class("Generate")
    return Generate(text=prompt, sampling={"max_tokens": LONG, "ignore_eos": True, "temperature": 0.0,
                                           "logprobs": logprobs})


def _compare(rng: random.Random):
    alphas = [rng.choice([0.5, 2.0, 3.0])] if rng.random() < 0.5 else []
    return request_class("CompareGenerations")(text="The capital of France is", alphas=alphas,
                                               sampling={"max_tokens": 48, "ignore_eos": True, "temperature": 0.0})


def cancel_one(ch, server, kind: str, rng: random.Random) -> dict:
    """One call of this kind, cancelled; returns its final code and when it was cancelled (monotonic)."""
    md = metadata(server)
    try:
        if kind == "before_first_token":
            stream = rpc(ch, "Generate")(_generate(logprobs=rng.choice([0, 5])), metadata=md, timeout=120)
            time.sleep(rng.uniform(0, 0.05))
            cancelled_at = time.monotonic()
            stream.cancel()
            list(stream)
        elif kind == "mid_stream":
            stream = rpc(ch, "Generate")(_generate(logprobs=rng.choice([0, 5])), metadata=md, timeout=120)
            for _, _message in zip(range(rng.randint(1, 8)), stream):
                pass
            cancelled_at = time.monotonic()
            stream.cancel()
            list(stream)
        elif kind == "compare":
            future = rpc(ch, "CompareGenerations").future(_compare(rng), metadata=md, timeout=120)
            time.sleep(rng.uniform(0.02, 1.5))
            cancelled_at = time.monotonic()
            future.cancel()
            future.result()
        else:  # deadline: the server sees it expire and must abort as for a cancel
            timeout = rng.uniform(0.05, 1.0)
            if rng.random() < 0.25:
                cancelled_at = time.monotonic() + timeout
                rpc(ch, "CompareGenerations")(_compare(rng), metadata=md, timeout=timeout)
            else:
                cancelled_at = time.monotonic() + timeout
                list(rpc(ch, "Generate")(_generate(), metadata=md, timeout=timeout))
        return {"kind": kind, "code": "FINISHED", "cancelled_at": time.monotonic()}
    except grpc.FutureCancelledError:
        return {"kind": kind, "code": "CANCELLED", "cancelled_at": cancelled_at}
    except grpc.RpcError as e:
        return {"kind": kind, "code": code_name(e), "cancelled_at": cancelled_at if code_name(e) in (
            "CANCELLED", "DEADLINE_EXCEEDED") else None}


def _child_spec(server) -> dict:
    tls = {k: str(v) for k, v in (server.tls or {}).items()}
    return {"target": server.target, "token": server.token, "tls": tls}


def kill_a_client(server, rng: random.Random, streams: int = STREAMS_PER_CHILD) -> list[dict]:
    """A client process with `streams` streams, SIGKILLed once each streams (or was refused)."""
    spec = json.dumps({**_child_spec(server), "streams": streams})
    child = subprocess.Popen([sys.executable, "-m", "reliability.cancel", "--child", spec], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parent.parent)
    codes: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(codes) < streams and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            codes.append(line.split()[-1])
        time.sleep(rng.uniform(0, 0.3))
        killed_at = time.monotonic()
    finally:
        child.kill()
        child.wait()
    codes += ["NO_ANSWER"] * (streams - len(codes))
    return [{"kind": "client_killed", "code": "KILLED" if code == "streaming" else code,
             "cancelled_at": killed_at if code == "streaming" else None} for code in codes]


def _child(spec: dict) -> None:
    """The client process that gets killed: streams until the parent kills it (at most 120 s). One line per
    stream: "streaming" at its first message, or the code that refused it."""
    class Target:  # enough of a server for common.channel and metadata
        target, token = spec["target"], spec["token"]
        tls = {k: Path(v) for k, v in spec["tls"].items()} or None

    ch = channel(Target())
    lock = threading.Lock()

    def say(line: str) -> None:  # print writes the text and the newline apart: threads would interleave them
        with lock:
            print(line, flush=True)

    def stream() -> None:
        try:
            for i, _message in enumerate(rpc(ch, "Generate")(_generate(), metadata=metadata(Target()), timeout=120)):
                if i == 0:
                    say("streaming")
        except grpc.RpcError as e:
            say(f"refused {code_name(e)}")

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(spec["streams"])]
    for t in threads:
        t.start()
    time.sleep(120)


def _open_files(server) -> int:
    count = 0
    for p in [psutil.Process(server.process.pid), *engine_processes(server)]:
        try:
            count += len(p.open_files())
        except psutil.NoSuchProcess:
            pass
    return count


def _settled(count, ceiling: int, timeout: float = 5) -> int:
    """The least of `count()` over `timeout` seconds (20 per second), early once it is at most `ceiling`: a
    connection the server is still closing (the golden call's) counts for a moment, a leaked one stays."""
    least = count()
    deadline = time.monotonic() + timeout
    while least > ceiling and time.monotonic() < deadline:
        time.sleep(0.05)
        least = min(least, count())
    return least


def _variants(server) -> list[str]:
    with channel(server) as ch:
        return list(rpc(ch, "GetModelInfo")(request_class("GetModelInfo")(), metadata=metadata(server),
                                            timeout=30).variants)


def time_to_idle(server, since: float, timeout: float = 30) -> float:
    """Seconds from `since` (monotonic) until the engine holds no unfinished request (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while unfinished(server) > 0:
        if time.monotonic() > deadline:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - since


def run_storm(server, calls: int = 1000, seed: int = 0, workers: int = 8, client_kills: int | None = None,
              streams_per_client: int = STREAMS_PER_CHILD, progress: bool = False) -> dict:
    """Cancel `calls` calls at random points on a running server (common.Server); about 5% of them (or
    `client_kills` processes of `streams_per_client` streams) by killing their client process."""
    rng = random.Random(seed)
    kills = client_kills if client_kills is not None else max(1, calls // 20 // streams_per_client)
    plain = calls - kills * streams_per_client
    kinds = [KINDS[i % 4] for i in range(plain)]
    rng.shuffle(kinds)
    before = {"golden": golden(server), "variants": _variants(server), "adapters": adapter_files(),
              "fds": psutil.Process(server.process.pid).num_fds(), "open_files": _open_files(server),
              "tasks": idle_asyncio_tasks(server)}
    results: list[dict] = []
    peak = [0.0]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            try:
                peak[0] = max(peak[0], unfinished(server))
            except OSError:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=calls, desc="cancel", unit="call")
    with channel(server) as ch, ThreadPoolExecutor(workers) as pool:
        def one(i: int) -> list[dict]:
            local = random.Random(seed * 100_003 + i)
            out = kill_a_client(server, local, streams_per_client) if i >= plain else \
                [cancel_one(ch, server, kinds[i], local)]
            if bar is not None:
                bar.update(len(out))
            return out

        for out in pool.map(one, range(plain + kills)):
            results.extend(out)
    if bar is not None:
        bar.close()
    last_cancel = max(r["cancelled_at"] for r in results if r["cancelled_at"] is not None)
    idle_after = time_to_idle(server, last_cancel)
    stop_sampling.set()
    seconds = time.monotonic() - start
    time.sleep(1)  # let the server finish its own bookkeeping before counting fds and files
    after = {"golden": golden(server), "variants": _variants(server), "adapters": adapter_files(),
             "fds": _settled(lambda: psutil.Process(server.process.pid).num_fds(), before["fds"]),
             "open_files": _settled(lambda: _open_files(server), before["open_files"]),
             "tasks": idle_asyncio_tasks(server)}
    codes = Counter((r["kind"], r["code"]) for r in results)
    return {"calls": len(results), "seed": seed, "workers": workers, "seconds": round(seconds, 1),
            "by_kind_and_code": {f"{k} {c}": n for (k, c), n in sorted(codes.items())},
            "cancelled": sum(r["cancelled_at"] is not None for r in results),
            "refused": sum(r["code"] == "RESOURCE_EXHAUSTED" for r in results),
            "unexpected": sum(r["code"] not in ("CANCELLED", "DEADLINE_EXCEEDED", "KILLED", "RESOURCE_EXHAUSTED")
                              for r in results),
            "peak_unfinished": peak[0], "last_cancel_to_idle_seconds": round(idle_after, 3),
            "golden_unchanged": before["golden"] == after["golden"],
            "variants_before": len(before["variants"]), "variants_after": len(after["variants"]),
            "adapters_before": before["adapters"], "adapters_after": after["adapters"],
            "fds_before": before["fds"], "fds_after": after["fds"],
            "open_files_before": before["open_files"], "open_files_after": after["open_files"],
            "asyncio_tasks_before": before["tasks"], "asyncio_tasks_after": after["tasks"],
            "asyncio_tasks_back_to_idle": before["tasks"] is not None and after["tasks"] == before["tasks"],
            "server_alive": server.process.poll() is None}


def main() -> int:
    parser = campaign_parser(__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the client process that gets killed
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return 0
    result = campaign("cancel", ["--canary-interval", "0"],
                      lambda server: run_storm(server, args.calls, args.seed, args.workers, progress=True),
                      front_ends=args.front_ends)
    held = result["last_cancel_to_idle_seconds"] <= 1 and result["golden_unchanged"]
    return 0 if held and result["asyncio_tasks_back_to_idle"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
