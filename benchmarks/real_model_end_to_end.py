"""A real model end to end in one call: prepare (convert the GGUF), detect from process start, compress w8a8, serve
the artifact, call every RPC, wait for a canary run; the time and peak memory of each step. On the GPU machine
detection runs in bfloat16 on the GPU (the offline default there); here it measures this machine.

    bash benchmarks/on_gpu.sh real_model_end_to_end    # device: the GGUF already in the device's model cache
    python -m benchmarks.real_model_end_to_end run --out /tmp/q    # this machine

Writes OUT/real_model_end_to_end.json as it goes, and the server's log next to it (real_model_server.log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from superweights.compression.report import SuperWeightReport
from superweights.server.harness import ServerProcess, free_port

MODEL = "qwen2.5-coder-0.5b-instruct"
RESULT, SERVER_LOG = "real_model_end_to_end.json", "real_model_server.log"
ARTIFACT = Path("/tmp/superweights-qwen-w8a8")
CANARY_OK = re.compile(r'superweights_canary_runs_total\{outcome="ok"\} [1-9]')


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the superweights CLI in a fresh process: (done, wall seconds, peak RSS MiB of that process, from the
    kernel's rusage of the child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "superweights.server.cli", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(process.args, os.waitstatus_to_exitcode(status), out.read(), err.read())
    return done, wall, usage.ru_maxrss / 1024  # Linux: KiB


def save(out: Path, results: dict) -> None:
    (out / RESULT).write_text(json.dumps(results, indent=2))


def detect_facts(stdout: str, wall: float, rss: float) -> dict:
    """The detection step's figures, from the report `detect --json` printed."""
    report = SuperWeightReport.from_dict(json.loads(stdout))
    return {"seconds_from_process_start": round(wall, 1), "peak_rss_mib": round(rss), "timings": report.timings,
            "device": report.evaluation.device, "dtype": report.evaluation.dtype,
            "baseline_perplexity": report.evaluation.baseline_perplexity,
            "super_weights": [(w.layer, w.row, w.col, w.value) for w in report.super_weights],
            "rejected": len(report.rejected_candidates),
            "super_activations": [(a.layer, a.last_layer, a.channel, a.value) for a in report.super_activations]}


def serve_and_call(artifact: Path, out: Path, results: dict) -> None:
    """Serve the artifact, call every RPC, wait for a canary run; the server stopped whatever happens."""
    port, metrics_port = free_port(), free_port()
    server = ServerProcess.start([sys.executable, "-m", "superweights.server.cli", "-q", "serve", str(artifact),
                                  "--port", str(port), "--metrics-port", str(metrics_port), "--canary-interval", "10"],
                                 out / SERVER_LOG)
    try:
        call_rpcs(server, port, results)
        results |= canary(metrics_port)
    finally:
        results["server_exit"] = server.stop(timeout=60)


def call_rpcs(server: ServerProcess, port: int, results: dict) -> None:
    from superweights.server.client import SuperWeightClient

    with SuperWeightClient(f"127.0.0.1:{port}", timeout=120) as client:
        results["serving_after_s"] = round(server.wait_until(lambda: client.health() == "SERVING", 400, "SERVING"), 1)
        info = client.model_info()
        report = client.super_weights()
        arms = ["base", "no_super_weights"] if report.super_weights else ["base"]
        compare = client.compare("The capital of France is", variants=arms, max_tokens=12, temperature=0.0)
        results["rpc"] = {
            "model_name": info.model_name, "quantization": info.quantization, "device": info.device,
            "dtype": info.dtype, "variants": list(info.variants),
            "generate": client.generate("def fibonacci(n):", max_tokens=24, temperature=0.0)["text"],
            "chat": client.generate("Write a Python function that adds two numbers.", chat=True, max_tokens=32,
                                    temperature=0.0)["text"],
            "super_weights": [(w.layer, w.row, w.col, w.engine_value) for w in report.super_weights],
            "super_activations": [(a.layer, a.channel, a.value) for a in report.super_activations],
            "compare": {a.variant: a.text for a in compare.arms}}


def canary(metrics_port: int, timeout: float = 120) -> dict:
    """Waits up to `timeout` for a canary run that passed; the canary's perplexities from /metrics."""
    deadline, metrics = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        if CANARY_OK.search(metrics):
            break
        time.sleep(2)
    return {"canary": dict(re.findall(r'superweights_canary_perplexity\{variant="([^"]+)"\} (\S+)', metrics)),
            "canary_ran": bool(CANARY_OK.search(metrics))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run",))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    parser.add_argument("--skip-serve", action="store_true", help="detect and compress only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import grpc

    from benchmarks.gpu_env import device_facts, register_plugin

    register_plugin()  # the artifact is served through our vLLM plugin: visible to every child process

    results: dict = {**device_facts(), "model": MODEL}
    done, wall, rss = cli("-q", "model", "prepare", MODEL)
    results["prepare"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss), "ok": done.returncode == 0,
                          "stdout": done.stdout.strip()}
    save(args.out, results)
    done, wall, rss = cli("-q", "detect", MODEL, "--no-cache", "--json")
    if done.returncode != 0:
        results["detect_error"] = done.stderr[-2000:]
        save(args.out, results)
        raise SystemExit(done.stderr[-2000:])
    results["detect"] = detect_facts(done.stdout, wall, rss)
    save(args.out, results)
    done, wall, rss = cli("-q", "compress", MODEL, "--scheme", "w8a8", "-o", str(ARTIFACT))
    results["compress"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss), "ok": done.returncode == 0,
                           "stdout": done.stdout.strip(), "stderr": done.stderr[-1500:] if done.returncode else ""}
    save(args.out, results)
    if done.returncode == 0 and not args.skip_serve:
        try:
            serve_and_call(ARTIFACT, args.out, results)
        except (RuntimeError, OSError, grpc.RpcError) as e:  # recorded, the JSON still comes back
            results["serve_error"] = repr(e)
    save(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
