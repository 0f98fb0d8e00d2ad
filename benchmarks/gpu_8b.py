"""An 8B-shaped model served four ways in one device call (issue 13, item 2): vLLM's offline `LLM` (the ceiling
for a front end), our server, vLLM's gRPC server (smg-grpc-servicer) and vLLM's OpenAI server, one after the other
on one H200, bf16, load_format=dummy, the same engine options, 1 / 32 / 256 concurrent streams of 128 tokens.

    python -m benchmarks.model_8b TOKENIZER_DIR .models/llama3-8b-shape        # here, once
    python -m benchmarks.gpu_8b run --model .models/llama3-8b-shape --out $OUT  # device (see BENCHMARKS.md)

Writes $OUT/gpu8b_serving.json after every arm (a timeout still returns what ran) and each server's log under
$OUT/logs. An arm that would not finish within --budget-s is skipped and says so.

The engine options come from our engine wrapper itself (SuperWeightEngine's AsyncEngineArgs for the declared
super weights), so every arm gets exactly what our server asks of vLLM, plus one scheduler setting written out for
all: max_num_seqs 1024 and max_num_batched_tokens 8192, the values vLLM's own servers take on an H100/H200
(UsageContext.OPENAI_API_SERVER; the offline LLM would take 16384 tokens). Our server used to build its engine in
vLLM's engine-only context, whose fallbacks are 128 sequences and 2048 batched tokens: at 256 streams half the
requests waited a whole generation in the engine's queue, which is what the earlier 933 ms TTFT p50 looks like
(server/engine.py now asks for the API server's context). The arm `ours-engine-context` runs our server with those
old values at 256 streams, when the budget allows, to show that this was the cause.

Per level, besides the client's tok/s, TTFT and ITL: the engine's own TTFT, queue and prefill time (vLLM's
histograms, differenced across the level), our servicer's TTFT, and the peaks of requests running and waiting in
the engine and of RPCs queued in our admission. Those separate the hypotheses for a TTFT gap: admission (our queue),
engine scheduling (engine queue time, waiting peak), the front end's delivery of per-token messages (client TTFT
above the servicer's), and LoRA (vllm-openai-nolora).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import (
    RunningServer,
    ServerSpec,
    free_port,
    prompts,
    run_level,
)
from benchmarks.engine_metrics import LevelProbe, registry_reader, url_reader

LEVELS, TOKENS = (1, 32, 256), 128
PER_CLIENT = {1: 8, 32: 4, 256: 3}  # requests each client sends at a level
ARMS = ("offline", "ours", "ours-ids", "vllm-grpc", "vllm-openai")  # ours-ids: token ids only, as vllm-grpc
EXTRA_ARMS = ("ours-engine-context", "vllm-openai-nolora")
SCHEDULER = {"max_num_seqs": 1024, "max_num_batched_tokens": 8192}
ENGINE_CONTEXT_SCHEDULER = {"max_num_seqs": 128, "max_num_batched_tokens": 2048}  # vLLM's SchedulerConfig fallbacks
SHARED = ("dtype", "max_model_len", "seed", "load_format", "enable_lora", "max_loras", "max_cpu_loras",
          "max_lora_rank", "lora_target_modules", "max_num_seqs", "max_num_batched_tokens")
LORA_KEYS = ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules")
# For every server: vLLM's periodic stats line (running / waiting, read from the logs of the gRPC server, which
# exports no metrics); and smg-grpc-servicer's additions switched off, so that its engine is the others' engine:
# its planned warm-up (up to 300 s of generated traffic before it reports SERVING), its default of vLLM's ZMQ
# KV-event publisher on, and its CUDA-graph capture cap (the engine's own default instead).
# (VLLM_CPU_KVCACHE_SPACE: the CPU build's KV cache in GiB, as benchmarks.common gives its servers; unused on GPU.)
ARM_ENV = {"VLLM_LOG_STATS_INTERVAL": "2", "SMG_VLLM_SERVICER_WARMUP": "off", "SMG_VLLM_SERVICER_KV_EVENTS": "0",
           "SMG_VLLM_CUDAGRAPH_CAPTURE_CAP": "engine", "VLLM_CPU_KVCACHE_SPACE": "2"}
FIRST_ARM_ESTIMATE_S = 170.0  # start (compile + CUDA graphs, ~80-110 s), levels, stop


# -- the model and the engine options, the same for every arm ----------------------------------------------------
@dataclass(frozen=True)
class Model:
    """What every arm serves: a model directory, its declared super weights, the dtype, and any further engine
    options for all arms (e.g. enforce_eager on CPU)."""

    path: Path
    super_weights: str = ""  # the --super-weights form; "" = Meta-Llama-3-8B's published ones
    dtype: str = "bfloat16"
    load_format: str = "dummy"
    extra: dict = field(default_factory=dict)

    @property
    def declared(self) -> str:
        from benchmarks.model_8b import declared_super_weights

        return self.super_weights or declared_super_weights()

    def report(self):
        from superweights.compression.declared import config_only_checkpoint, declared_report
        from superweights.compression.published import parse_coordinates

        return declared_report(config_only_checkpoint(self.path), parse_coordinates(self.declared))


def engine_options(model: Model, lora: bool = True, scheduler: dict | None = None) -> dict:
    """The AsyncEngineArgs fields our server sets for the declared super weights, as keywords for any arm."""
    from superweights.server.engine import EngineConfig, SuperWeightEngine

    scheduler = SCHEDULER if scheduler is None else scheduler
    config = EngineConfig(checkpoint=model.path, dtype=model.dtype,
                          engine_options={"load_format": model.load_format, **scheduler, **model.extra})
    args = SuperWeightEngine(config, model.report())._engine_args()  # what our server hands vLLM
    options = {k: getattr(args, k) for k in (*SHARED, *model.extra) if getattr(args, k) is not None}
    return options if lora else {k: v for k, v in options.items() if k not in LORA_KEYS}


def cli_flags(options: dict) -> list[str]:
    """AsyncEngineArgs keywords as vLLM server flags (lists take several values, True is a bare switch)."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def ours_flags(options: dict) -> list[str]:
    """Our server's own options for what it sets itself, --engine-arg for the rest (LoRA follows the report)."""
    own = {"dtype": "--dtype", "max_model_len": "--max-model-len", "seed": "--seed"}
    flags = [x for key, flag in own.items() if key in options for x in (flag, str(options[key]))]
    passed = {k: v for k, v in options.items() if k not in own and k not in LORA_KEYS}
    return flags + [x for k, v in passed.items() for x in ("--engine-arg", f"{k}={json.dumps(v)}")]


def grpc_module() -> str:
    """vLLM's gRPC launcher: vllm.entrypoints.grpc_server in 0.26, moved under launchers/ later."""
    moved = "vllm.entrypoints.launchers.grpc_server"
    return moved if importlib.util.find_spec("vllm.entrypoints.launchers") and importlib.util.find_spec(moved) \
        else "vllm.entrypoints.grpc_server"


def server_spec(name: str, model: Model, options: dict) -> tuple[ServerSpec, int | None]:
    """(how to start `name` on free loopback ports, its metrics port or None)."""
    port, host, model_dir = free_port(), ["--host", "127.0.0.1"], model.path
    if name in ("ours", "ours-ids", "ours-engine-context"):
        metrics = free_port()
        cmd = [sys.executable, "-m", "superweights.server.cli", "-q", "serve", str(model_dir), "--port", str(port),
               "--metrics-port", str(metrics), "--canary-interval", "0", "--max-concurrent", "1024",
               "--max-queue", "1024", "--super-weights", model.declared, *ours_flags(options)]
        return ServerSpec(name, cmd, port, "ours-ids" if name == "ours-ids" else "ours", "grpc-health"), metrics
    if name in ("vllm-openai", "vllm-openai-nolora"):
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port",
               str(port), *host, "--served-model-name", "m", *cli_flags(options)]
        return ServerSpec(name, cmd, port, "openai", "http"), port
    if name == "vllm-grpc":
        cmd = [sys.executable, "-m", grpc_module(), "--model", str(model_dir), "--port", str(port), *host,
               *cli_flags(options)]
        return ServerSpec(name, cmd, port, "vllm-grpc", "grpc-port"), None
    raise ValueError(f"unknown arm {name!r}: {', '.join(ARMS + EXTRA_ARMS)}")


def arm_options(name: str, model: Model) -> dict:
    if name == "vllm-openai-nolora":
        return engine_options(model, lora=False)
    if name == "ours-engine-context":
        return engine_options(model, scheduler=ENGINE_CONTEXT_SCHEDULER)
    return engine_options(model)


# -- one server arm ----------------------------------------------------------------------------------------------
def ours_checks(port: int, prompt_ids: list[int]) -> dict:
    """The served super weights as the engine computes with them, and the base arm against base alone."""
    from superweights.server.client import SuperWeightClient

    with SuperWeightClient(f"127.0.0.1:{port}") as client:
        report = client.super_weights()
        alone = client.generate(prompt_ids, max_tokens=8, temperature=0.0)
        compare = client.compare(prompt_ids, max_tokens=8, temperature=0.0)
        arms = {a.variant: list(a.token_ids) for a in compare.arms}
        return {"variants": list(client.model_info().variants),
                "super_weights": [(w.layer, w.row, w.col, w.engine_value) for w in report.super_weights],
                "base_arm_equals_base_alone": arms.get("base") == alone["token_ids"],
                "removal_arm_differs": arms.get("no_super_weights") != arms.get("base")}


def log_peaks(log: Path) -> dict:
    """Peaks of vLLM's periodic 'Running: N reqs, Waiting: M reqs' lines (every VLLM_LOG_STATS_INTERVAL s)."""
    import re

    pairs = [(int(r), int(w)) for r, w in re.findall(r"Running: (\d+) reqs, Waiting: (\d+) reqs",
                                                      log.read_text(errors="replace"))] if log.is_file() else []
    return {"running": max((r for r, _ in pairs), default=None), "waiting": max((w for _, w in pairs), default=None)}


def scheduler_facts(log: Path) -> dict:
    """max_num_seqs / max_num_batched_tokens as the engine logged them, where it did."""
    import re

    text = log.read_text(errors="replace") if log.is_file() else ""
    found = {}
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        match = re.search(rf"{key}[=:\s]+(\d+)", text)
        if match:
            found[key] = int(match.group(1))
    return found


async def measure_server(name: str, model: Model, prompt_set: list[list[int]], levels: tuple[int, ...],
                         tokens: int, log_dir: Path, ready_timeout: float, on_level, label: str = "") -> dict:
    """Start the server `name` serves `model` with, check it (ours), run the levels, stop it; on_level(result)
    after each level. A failure is recorded in the result, not raised."""
    options = arm_options(name, model)
    spec, metrics_port = server_spec(name, model, options)
    result = {"arm": label or name, "command": " ".join(spec.command), "engine_options": options, "levels": []}
    server = RunningServer(spec, log_dir)
    try:
        result["startup_seconds"] = await server.wait_ready(ready_timeout)
        if spec.client in ("ours", "ours-ids"):
            result["checks"] = await asyncio.to_thread(ours_checks, spec.port, prompt_set[0])
        read = url_reader(f"http://127.0.0.1:{metrics_port}/metrics") if metrics_port else None
        client = server.client()
        try:
            for p in prompt_set[:2]:
                await client.stream(p, 16)  # warm-up
            for concurrency in levels:
                level = await _measured_level(server, client, prompt_set, concurrency, tokens, read)
                result["levels"].append(level)
                on_level(result)
        finally:
            await client.close()
    except Exception as e:  # noqa: BLE001 -- one arm failing must not lose the others' numbers
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
        result["log_peaks"], result["scheduler"] = log_peaks(server.log), scheduler_facts(server.log)
    return result


async def _measured_level(server, client, prompt_set, concurrency: int, tokens: int, read) -> dict:
    if read is None:
        level = await run_level(server, client, prompt_set, concurrency, PER_CLIENT.get(concurrency, 2), tokens)
        return level.summary()
    with LevelProbe(read) as probe:
        level = await run_level(server, client, prompt_set, concurrency, PER_CLIENT.get(concurrency, 2), tokens)
    return {**level.summary(), "server_side": probe.summary()}


# -- the offline arm, in a child process so its GPU memory is released before the servers start ------------------
def offline_levels(model: Model, options: dict, prompt_set: list[list[int]], levels: tuple[int, ...],
                   tokens: int, lora_mix: float = 0.0) -> dict:
    """vLLM's LLM: for each level, PER_CLIENT rounds of `level` prompts submitted at once (greedy, ignore_eos).

    Args:
        lora_mix: share of each batch sent to the removal adapter (0: base requests only).
    """
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model.path), disable_log_stats=False, **options)
    result = {"startup_seconds": time.perf_counter() - t0, "levels": []}
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompt_set[:4]], params, use_tqdm=False)  # warm-up
    for n in levels:
        result["levels"].append(offline_level(llm, params, prompt_set, n, PER_CLIENT.get(n, 2)))
    return result


def offline_level(llm, params, prompt_set: list[list[int]], n: int, rounds: int, lora=None) -> dict:
    """One level of the offline engine: tok/s over `rounds` batches of n, and the engine's own latencies."""
    batch = [{"prompt_token_ids": prompt_set[i % len(prompt_set)]} for i in range(n)]
    walls, tokens = [], 0
    with LevelProbe(registry_reader()) as probe:
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False, lora_request=lora)
            walls.append(time.perf_counter() - t0)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return {"concurrency": n, "requests": n * rounds, "tokens": tokens, "seconds": sum(walls),
            "tokens_per_s": tokens / sum(walls), "batch_seconds_median": statistics.median(walls),
            "server_side": probe.summary()}


def run_child(args: list[str], timeout: float, module: str = "benchmarks.gpu_8b", log: Path | None = None) -> dict:
    """`python -m MODULE <args> --result FILE`: what it wrote to FILE. Its output goes to `log`; a failure is
    recorded with the exception lines found there (vLLM's root cause comes before its final RuntimeError)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu8b-child-{os.getpid()}-{time.monotonic_ns()}.json"
    log = log or out.with_suffix(".log")
    with open(log, "w") as sink:
        try:
            proc = subprocess.run([sys.executable, "-m", module, *args, "--result", str(out)], timeout=timeout,
                                  stdout=sink, stderr=subprocess.STDOUT, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s; see {log.name}"}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}; see {log.name}: {exception_lines(log.read_text(errors='replace'))}"}
    return json.loads(out.read_text())


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


# -- the call --------------------------------------------------------------------------------------------------
def device_facts() -> dict:
    """Date, GPU (from nvidia-smi: no CUDA context in this process, the servers want the memory), vLLM, torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpu = []
    versions = {}
    for dist in ("vllm", "torch", "smg-grpc-servicer"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {"date": time.strftime("%Y-%m-%d"), "gpu": gpu[0] if gpu else None, "gpus": len(gpu),
            "vllm": versions["vllm"], "torch": versions["torch"], "smg_grpc_servicer": versions["smg-grpc-servicer"]}


class Budget:
    """Seconds left in the device call; an arm starts only if it fits. The first arm compiles the graphs that the
    later arms of the same shape load from vLLM's cache, so once two arms ran, the slowest after the first is the
    estimate; before that, the first arm's time (or a guess)."""

    def __init__(self, seconds: float, first_estimate: float = FIRST_ARM_ESTIMATE_S, margin: float = 15.0):
        self.start, self.seconds, self.estimate, self.margin = time.monotonic(), seconds, first_estimate, margin
        self.durations: list[float] = []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def fits(self) -> bool:
        known = self.durations[1:] or self.durations or [self.estimate]
        return self.left() >= max(known) + self.margin

    def record(self, seconds: float) -> None:
        self.durations.append(seconds)


def arm_env() -> dict:
    """ARM_ENV set for this process and what it starts (values already set are kept); returns them."""
    for key, value in ARM_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in ARM_ENV}


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def model_prompts(model: Model) -> list[list[int]]:
    from transformers import AutoTokenizer

    return prompts(AutoTokenizer.from_pretrained(model.path), n=8, length=32)


def run(model: Model, args: argparse.Namespace) -> dict:
    from benchmarks.gpu_env import register_plugin

    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    budget = Budget(args.budget_s)
    prompt_set = model_prompts(model)
    results = {**device_facts(), "plugin": register_plugin(), "env": arm_env(),
               "model": {**asdict(model), "path": str(model.path)},
               "super_weights": model.declared, "config": json.loads((model.path / "config.json").read_text()),
               "levels": list(args.levels), "tokens": args.tokens, "per_client": PER_CLIENT,
               "budget_s": args.budget_s, "arms": []}
    path = args.out / "gpu8b_serving.json"

    def measure(name: str, arm: dict, saved) -> None:
        levels = (256,) if name == "ours-engine-context" else tuple(args.levels)
        if name == "offline":
            arm.update(engine_options=engine_options(model), **run_child(
                ["offline", *model_args(model), "--levels", *map(str, levels), "--tokens", str(args.tokens)],
                timeout=max(budget.left(), 1), log=log_dir / "offline.log"))
        else:
            arm.update(asyncio.run(measure_server(name, model, prompt_set, levels, args.tokens, log_dir,
                                                  args.ready_timeout, lambda partial: saved(arm.update(partial)))))

    run_in_turn(args.arms, "arm", results, results["arms"], path, budget, measure)
    return results


def run_in_turn(names, key: str, results: dict, entries: list, path: Path, budget: Budget, measure) -> None:
    """measure(name, entry, saved) for each name that fits the budget, in order, the others recorded as skipped;
    `results` saved to `path` after each (and whenever measure calls saved())."""
    def saved(_=None) -> None:
        save(path, results)

    saved()
    for name in names:
        entry = {key: name}
        entries.append(entry)
        if not budget.fits():
            entry["skipped"] = f"{budget.left():.0f} s left in the call's budget"
            saved()
            continue
        t0 = time.monotonic()
        measure(name, entry, saved)
        entry["wall_seconds"] = time.monotonic() - t0
        budget.record(entry["wall_seconds"])
        saved()
        print(json.dumps({k: entry.get(k) for k in (key, "startup_seconds", "wall_seconds", "error")}), flush=True)


def write_child_result(path: Path, compute) -> None:
    """A child process's end: the plugin registered, then compute()'s result as JSON where the parent reads it."""
    from benchmarks.gpu_env import register_plugin

    register_plugin()
    path.write_text(json.dumps(compute()))


def add_model_options(p: argparse.ArgumentParser) -> None:
    m = Model(Path(".models/llama3-8b-shape"))
    p.add_argument("--model", type=Path, default=m.path,
                   help="model directory (benchmarks.model_8b), or 'default' for the default model")
    p.add_argument("--super-weights", default=m.super_weights, metavar="L:ROW:COL,...",
                   help="declared super weights (default: Meta-Llama-3-8B's published ones)")
    p.add_argument("--dtype", default=m.dtype)
    p.add_argument("--load-format", default=m.load_format)
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                   help="one more engine option for every arm, e.g. enforce_eager=true (repeat)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every device call takes: the model, where the JSON goes, output length, the time budget."""
    add_model_options(p)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/gpu")))
    p.add_argument("--tokens", type=int, default=TOKENS, help="greedy tokens per request (%(default)s)")
    p.add_argument("--budget-s", type=float, default=530, help="what would end later is skipped (%(default)s)")


def model_from(args: argparse.Namespace) -> Model:
    """--model default: the default model's checkpoint (SmolLM2-135M, from the pack's GGUF payload on the device),
    to measure a change on the model the earlier GPU figures are of."""
    extra = {}
    for pair in args.engine_option:
        key, _, raw = pair.partition("=")
        extra[key.replace("-", "_")] = json.loads(raw)
    path = args.model
    if str(path) == "default":
        from benchmarks.common import place_default_model
        from superweights.compression.models import resolve_checkpoint

        place_default_model()
        path = Path(resolve_checkpoint(None).path)
    return Model(path, args.super_weights, args.dtype, args.load_format, extra)


def model_args(model: Model) -> list[str]:
    """The command-line options that rebuild `model` in a child process."""
    return ["--model", str(model.path), "--super-weights", model.super_weights, "--dtype", model.dtype,
            "--load-format", model.load_format,
            *[x for k, v in model.extra.items() for x in ("--engine-option", f"{k}={json.dumps(v)}")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("run", help="every arm, one after the other (the device call)")
    add_run_options(p)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + EXTRA_ARMS)
    p.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    p.add_argument("--ready-timeout", type=float, default=400)
    c = sub.add_parser("offline", help="(child) the offline LLM arm")
    add_model_options(c)
    c.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    c.add_argument("--tokens", type=int, default=TOKENS)
    c.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    model = model_from(args)
    if args.what == "run":
        run(model, args)
        return
    write_child_result(args.result, lambda: offline_levels(model, engine_options(model), model_prompts(model),
                                                         tuple(args.levels), args.tokens))


if __name__ == "__main__":
    main()
