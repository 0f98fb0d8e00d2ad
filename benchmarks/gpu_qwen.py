"""Qwen2.5-Coder-0.5B-Instruct end to end on the GPU machine, in one device call: prepare (convert the GGUF),
detect from process start (bfloat16 on the GPU: the offline default there), compress w8a8 on the GPU, serve the
artifact, call every RPC, wait for a canary run. Writes gpu_qwen.json to --out as it goes.

    bash benchmarks/gpu_8b.sh gpu_qwen      # the GGUF already in the device's cache (see BENCHMARKS.md's steps)

Run here (CPU) the same script measures this machine: `python -m benchmarks.gpu_qwen run --out /tmp/q`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

MODEL = "qwen2.5-coder-0.5b-instruct"


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the superweights CLI in a fresh process: (done, wall seconds, peak RSS MiB of that process, from the
    kernel's rusage of the child)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "superweights.server.cli", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(process.args, os.waitstatus_to_exitcode(status), out.read(), err.read())
    return done, wall, usage.ru_maxrss / 1024  # Linux: KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save(out: Path, results: dict) -> None:
    (out / "gpu_qwen.json").write_text(json.dumps(results, indent=2))


def serve_and_call(artifact: Path, out: Path, results: dict) -> None:
    with open(out / "gpu_qwen_server.log", "w") as log:
        port, metrics_port = free_port(), free_port()
        server = subprocess.Popen([sys.executable, "-m", "superweights.server.cli", "-q", "serve", str(artifact),
                                   "--port", str(port), "--metrics-port", str(metrics_port), "--canary-interval", "10"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _call(server, port, metrics_port, results)
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
            results["server_exit"] = server.returncode


def _call(server: subprocess.Popen, port: int, metrics_port: int, results: dict) -> None:
    import grpc

    from superweights.server.client import SuperWeightClient

    start = time.perf_counter()
    with SuperWeightClient(f"127.0.0.1:{port}", timeout=120) as client:
        while time.perf_counter() - start < 400:
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode}; see gpu_qwen_server.log")
            try:
                if client.health() == "SERVING":
                    break
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(1)
        results["serving_after_s"] = round(time.perf_counter() - start, 1)
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
    import urllib.request

    deadline = time.monotonic() + 120
    metrics = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        if re.search(r'superweights_canary_runs_total\{outcome="ok"\} [1-9]', metrics):
            break
        time.sleep(2)
    results["canary"] = dict(re.findall(r'superweights_canary_perplexity\{variant="([^"]+)"\} (\S+)', metrics))
    results["canary_ran"] = bool(re.search(r'superweights_canary_runs_total\{outcome="ok"\} [1-9]', metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run",))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    parser.add_argument("--skip-serve", action="store_true", help="detect and compress only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import grpc
    import torch

    from benchmarks.common import device_facts
    from benchmarks.gpu_env import register_plugin

    register_plugin()  # the artifact is served through our vLLM plugin: visible to every child process

    results: dict = {**device_facts("cuda" if torch.cuda.is_available() else "cpu"), "model": MODEL}
    done, wall, rss = cli("-q", "model", "prepare", MODEL)
    results["prepare"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss), "ok": done.returncode == 0,
                          "stdout": done.stdout.strip()}
    save(args.out, results)
    done, wall, rss = cli("-q", "detect", MODEL, "--no-cache", "--json")
    if done.returncode != 0:
        results["detect_error"] = done.stderr[-2000:]
        save(args.out, results)
        raise SystemExit(done.stderr[-2000:])
    report = json.loads(done.stdout)
    results["detect"] = {"seconds_from_process_start": round(wall, 1), "peak_rss_mib": round(rss),
                         "timings": report["timings"], "device": report["eval"].get("device"),
                         "dtype": report["eval"].get("dtype"), "baseline_perplexity": report["eval"]["baseline_perplexity"],
                         "super_weights": [(w["layer"], w["row"], w["col"], w["value"]) for w in report["super_weights"]],
                         "rejected": len(report["rejected_candidates"]),
                         "super_activations": [(a["layer"], a.get("last_layer"), a["channel"], a["value"])
                                               for a in report["super_activations"]]}
    save(args.out, results)
    artifact = Path("/tmp/superweights-qwen-w8a8")
    done, wall, rss = cli("-q", "compress", MODEL, "--scheme", "w8a8", "-o", str(artifact))
    results["compress"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss), "ok": done.returncode == 0,
                           "stdout": done.stdout.strip(), "stderr": done.stderr[-1500:] if done.returncode else ""}
    save(args.out, results)
    if done.returncode == 0 and not args.skip_serve:
        try:
            serve_and_call(artifact, args.out, results)
        except (RuntimeError, OSError, grpc.RpcError) as e:  # recorded, the JSON still comes back
            results["serve_error"] = repr(e)
    save(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
