"""BENCHMARKS.md and its plots from every saved result, their one writer. This module computes figures and tables;
the prose is benchmarks/BENCHMARKS.template.md, whose slots benchmarks.markdown fills; benchmarks.plots draws.

    .venv/bin/python -m benchmarks.report

Reads, under benchmarks/: results.json (serving_default_model cpu), detection.json (detection_cost), limits.json
(machine_limits), zero_adapter.json (zero_adapter_cost), profile.json (profile_frontend), cpu_front_ends.json
(serving_side_by_side on the CPU engine), correction_overhead.json (correction_overhead). Under benchmarks/gpu/:
gpu_*.json (serving_default_model gpu), lora_scope_*.json (lora_scope), first_session_lora.json (an earlier
measurement, noted by hand), artifacts_*.json (artifacts_through_engine), gpu8b_serving.json and
gpu8b_serving_first.json (serving_side_by_side), ttft_135m.json (serving_side_by_side on the default model's
architecture), gpu8b_front_ends.json (serving_side_by_side with several front ends), gpu8b_lora.json and
gpu8b_lora_first.json (lora_cost), gpu8b_quant_*.json (quantized_decode), gpu8b_quant_side_by_side_call*.json and
profile_decode_*.txt (quantized_decode side by side with plain vLLM, one file a device call, and the torch
profiler's tables it wrote), gpu8b_tp.json (tensor_parallel).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks import plots
from benchmarks.arms import front_ends_of
from benchmarks.engine_metrics import POLL_INTERVAL_S
from benchmarks.load import PROMPT_TOKENS
from benchmarks.markdown import document, fill, paragraphs, table
from benchmarks.model_8b import LLAMA3_8B
from benchmarks.quantized_decode import variant
from benchmarks.served_model import ENGINE_CONTEXT_SCHEDULER, SCHEDULER

ROOT = Path(__file__).resolve().parent.parent
GPU_PLOTS = "benchmarks/gpu"  # where BENCHMARKS.md finds the GPU plots
OFFLINE_SHARE_GOAL, OFFLINE_GOAL_STREAMS = 0.95, 256  # ours: at least this share of the offline engine's tok/s
W4A16_SPEEDUP_GOAL = 1.5  # w4a16 decode at batch 1, against bf16
# HBM bandwidth, for the quantized-decode arithmetic; NVIDIA's datasheets: H200 SXM, and H100 SXM5 (80GB HBM3)
READ_BANDWIDTH_TB_S = {"H200": 4.8, "H100 80GB HBM3": 3.35}
FRONT_ENDS_OFFLINE_STREAMS = (256, 512)  # several front ends: at least OFFLINE_SHARE_GOAL of offline at these
ITL_GOAL_STREAMS, ITL_STEP_GOAL_MS = 1, 0.2  # ours: ITL p50 within this of the offline engine's time per step
FRONT_END_COUNTS = (1, 2, 4, 8)  # the front-end processes a side-by-side call is asked about
GIVEN_OPTIONS = ("compilation_config",)  # engine options a call was given (--engine-option), not our server's own
PLAIN_SHARE_GOAL = 0.97  # ours protected, LoRA on: at least this share of plain vLLM's decode tok/s, same scheme
# side by side: decode tok/s against bf16 at SPEEDUP_GOAL_STREAMS, ours and plain vLLM's
SPEEDUP_GOALS, SPEEDUP_GOAL_STREAMS = {"w4a16": 1.8, "fp8-dynamic": 1.5}, 1
SIDE_BY_SIDE = "gpu8b_quant_side_by_side_call"  # its files: one a device call, numbered
INT4_GEMM = "void cutlass::device_kernel<cutlass::gemm"  # Machete's GEMM (vLLM's int4 kernel on Hopper) in a profile
BF16_BYTES = 2  # the LM head's weights; an int4 group's scale (symmetric: no zero point)
PROFILE_TOP = 8  # kernels shown from a profile, by self CUDA time
LORA_LABELS = {"off": "off", "all": "on, every module (vLLM's default)", "down_proj": "on, down_proj only (ours)"}
AB_CALLS = {"one_generate": "one `Generate`", "compare_two_arms": "`CompareGenerations`, base + no_super_weights",
            "two_generates": "two sequential `Generate`"}
LEVEL_CELLS = {"tok/s": lambda lv: f"{lv['tokens_per_s']:,.0f}",
               "TTFT p50 ms": lambda lv: _ms(lv.get("ttft_p50_ms")), "TTFT p99 ms": lambda lv: _ms(lv.get("ttft_p99_ms")),
               "ITL p50 ms": lambda lv: _ms(lv.get("itl_p50_ms"), ".2f"),
               "ITL p99 ms": lambda lv: _ms(lv.get("itl_p99_ms"), ".2f"), "errors": lambda lv: str(lv.get("errors", 0))}
# (ours, theirs, figure, its name): the 8B ratio lines, like-for-like pairs among them
RATIOS_8B = (("ours", "offline", "tokens_per_s", "tok/s"), ("ours-ids", "offline", "tokens_per_s", "tok/s"),
             ("ours-ids", "vllm-grpc", "tokens_per_s", "tok/s"), ("ours", "vllm-grpc", "tokens_per_s", "tok/s"),
             ("ours", "vllm-openai", "tokens_per_s", "tok/s"), ("ours", "vllm-openai", "ttft_p50_ms", "TTFT p50"),
             ("ours-ids", "vllm-grpc", "ttft_p50_ms", "TTFT p50"))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    write_report(ROOT / "BENCHMARKS.md", ROOT / "benchmarks")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


def write_report(path: Path, out_dir: Path) -> None:
    """Render every saved result under `out_dir` into `path`; the plots go next to the results."""
    gpu = out_dir / "gpu"
    gpu_runs = [json.loads(p.read_text()) for p in sorted(gpu.glob("gpu_*.json"))]
    sections = [*cpu_sections(out_dir, path.parent), gpu_section(gpu_runs),
                lora_scope_section(_entries(gpu, "lora_scope_*.json"), _entries(gpu, "first_session_lora.json")),
                artifacts_section(_entries(gpu, "artifacts_*.json")), "\n".join(gpu8b_lines(gpu))]
    path.write_text(document(sections))


# -- reading results ---------------------------------------------------------------------------------------------
def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _entries(directory: Path, pattern: str) -> list[dict]:
    """The entries of every JSON list file matching `pattern`, in file-name order."""
    return [r for p in sorted(directory.glob(pattern)) for r in json.loads(p.read_text())]


def _by_level(entries: list[dict], key: str) -> dict[str, dict[int, dict]]:
    """{entry[key]: {streams: level}} of entries with "levels" (servers, arms)."""
    return {e[key]: {lv["concurrency"]: lv for lv in e.get("levels", [])} for e in entries}


def _ratio(a: dict, b: dict, key: str) -> float:
    return a[key] / b[key] if b[key] else float("nan")


def _ms(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _short(gpu: str) -> str:
    return gpu.removeprefix("NVIDIA ")


def _distinct(runs: list[dict], key: str, spec: str = "") -> str:
    """The values of `key` across `runs`, each once: one date, or two where the runs spanned two days."""
    return ", ".join(sorted({format(r[key], spec) for r in runs}))


def _flags(command: str) -> dict[str, list[str]]:
    """A server command's --flags and their values."""
    flags: dict[str, list[str]] = {}
    current = None
    for word in command.split():
        if word.startswith("--"):
            current = flags.setdefault(word, [])
        elif current is not None:
            current.append(word)
    return flags


def _engine_flags(command: str) -> str:
    """The engine flags of a vLLM server's command: all but where it listens and what it calls the model."""
    placed = ("--model", "--port", "--host", "--served-model-name")
    return " ".join(" ".join([flag, *values]) for flag, values in _flags(command).items() if flag not in placed)


# -- markdown pieces ---------------------------------------------------------------------------------------------
def _each_level(values: dict[int, str]) -> str:
    """'1 streams 0.98, 256 streams 0.98'."""
    return ", ".join(fill("level_value", streams=c, value=v) for c, v in values.items())


def _per_stream(per_client: dict) -> str:
    """'8 at 1 / 4 at 32 / 3 at 256'."""
    return " / ".join(fill("at_level", value=v, level=k) for k, v in per_client.items())


def _requests_per_client(levels: list[dict]) -> str:
    """Requests each client sent: the same at every level, or the first level's and those above."""
    levels = sorted(levels, key=lambda lv: lv["concurrency"])
    first, *rest = (lv["requests"] // lv["concurrency"] for lv in levels)
    above = sorted(set(rest))
    if above in ([], [first]):
        return fill("per_client_same", first=first)
    return fill("per_client_first", first=first, level=levels[0]["concurrency"], above=" / ".join(map(str, above)))


def _unfinished(entries: list[dict], key: str) -> str:
    """'`name` skipped: why.' / '`name` did not complete: error', a paragraph each."""
    return paragraphs(*(fill("skipped", name=e[key], why=e["skipped"]) if e.get("skipped") else
                        fill("did_not_complete", name=e[key], error=e["error"][:300])
                        for e in entries if e.get("skipped") or e.get("error")))


def _level_table(by_arm: dict[str, dict[int, dict]], columns: list[str]) -> str:
    """One row per arm and level (streams), the LEVEL_CELLS named by `columns`."""
    return table(["arm", "streams", *columns],
                 ([arm, str(c), *(LEVEL_CELLS[k](lv) for k in columns)]
                  for arm, levels in by_arm.items() for c, lv in sorted(levels.items())), "lr" + "r" * len(columns))


def _plot(png: str | None) -> str:
    return fill("plot", name=png, path=f"{GPU_PLOTS}/{png}") if png else ""


# -- the development machine -------------------------------------------------------------------------------------
def cpu_sections(out_dir: Path, doc_dir: Path) -> list[str]:
    """Serving, the A/B cost, detection, the machine's limits and where ours is slower, on the CPU."""
    results = json.loads((out_dir / "results.json").read_text())
    by_server = _by_level(results["servers"], "server")
    # the engine options as vLLM's OpenAI server was given them (any server's where it did not run)
    flags = _engine_flags(next((s["command"] for s in sorted(results["servers"], key=lambda s: s["server"] !=
                                                              "vllm-openai")), ""))
    dtype = _flags(flags).get("--dtype", ["-"])[0]
    plot_files = plots.cpu_serving(by_server, results["machine"]["cores"], out_dir)
    plot_dir = out_dir.relative_to(doc_dir)
    detection, limits = _json(out_dir / "detection.json"), _json(out_dir / "limits.json")
    return [cpu_header(results, flags, dtype), cpu_serving(results, by_server),
            paragraphs(*(fill("plot", name=f, path=f"{plot_dir}/{f}") for f in plot_files)),
            ab_section(results), detection_section(detection) if detection else "",
            limits_section(limits, by_server, dtype) if limits else "", gap_section(by_server, out_dir),
            cpu_front_ends_section(_json(out_dir / "cpu_front_ends.json")),
            correction_section(_json(out_dir / "correction_overhead.json"))]


def cpu_front_ends_section(run: dict | None) -> str:
    """serving_side_by_side on the CPU engine: the offline engine, ours with one front end and with more."""
    if not run:
        return ""
    runs = _by_run(run["arms"], "arm")
    offline = runs.get("offline", {})
    rows = [[arm, str(c), str(r), f"{lv['tokens_per_s']:,.1f}",
             f"{_ratio(lv, offline[(c, r)], 'tokens_per_s'):.2f}" if (c, r) in offline else "-",
             _ms(lv.get("ttft_p50_ms")), _ms(lv.get("itl_p50_ms"), ".1f"),
             _ms(lv.get("frontend_cpu_s_per_1k_tokens"), ".2f"), _ms(lv.get("tokens_per_message"), ".3f")]
            for c in sorted({c for levels in runs.values() for c, _ in levels})
            for arm, levels in runs.items() for (s, r), lv in sorted(levels.items()) if s == c]
    measured = [a for a in run["arms"] if a.get("levels")]
    repeat = max(r for levels in runs.values() for _, r in levels)
    return fill("cpu_front_ends", date=run["date"], vllm=run["vllm"], tokens=run["tokens"], repeat=repeat,
                spreads=_spreads(runs) if repeat > 1 else "-",
                arms=" ".join(a["arm"] for a in run["arms"]), levels=" ".join(map(str, run["levels"])),
                client_processes=_distinct([a for a in measured if "client_processes" in a], "client_processes"),
                failures=_unfinished(run["arms"], "arm"),
                table=table(["arm", "streams", "run", "tok/s", "x offline", "TTFT p50 ms", "ITL p50 ms",
                             "front-end CPU s / 1k tok", "tokens / message"], rows, "lrrrrrrrr"))


def correction_section(result: dict | None) -> str:
    """benchmarks.correction_overhead: the protected down-projection against the plain one, per token count."""
    if not result:
        return ""
    rows = [[str(r["tokens"]), f"{r['plain_us']:,.1f}", f"{r['protected_us']:,.1f}", f"{r['protected_over_plain']:.3f}",
             f"{r['max_abs_difference']:.1e} of {r['output_scale']:.1f}"] for r in result["rows"]]
    shape = result["shape"]
    return fill("correction_overhead", date=result["date"], machine=result["machine"],
                threads=result["torch_threads"], dtype=result["dtype"], command=result["command"],
                inputs=f"{shape['in']:,}", outputs=f"{shape['out']:,}", columns=shape["protected_columns"],
                table=table(["tokens", "plain us", "protected us", "protected / plain", "max difference"], rows,
                            "rrrrr"))


def cpu_header(results: dict, flags: str, dtype: str) -> str:
    m, w = results["machine"], results["workload"]
    per_client = _requests_per_client(next(s["levels"] for s in results["servers"] if s["levels"]))
    return fill("cpu", date=m["date"], cpu=m["cpu"], cores=m["cores"], memory_gib=m["memory_gib"], vllm=m["vllm"],
                torch=m["torch"], python=m["python"], noise=f" ({m['noise']})" if m.get("noise") else "",
                dtype=dtype, output_tokens=w["output_tokens"], prompt_tokens=w["prompt_tokens"], prompts=w["prompts"],
                per_client=per_client, engine_flags=flags, kv_cache_gib=results["env"]["VLLM_CPU_KVCACHE_SPACE"])


def cpu_serving(results: dict, by_server: dict[str, dict[int, dict]]) -> str:
    rows = ([server, str(c), f"{lv['tokens_per_s']:.1f}", f"{lv['ttft_p50_ms']:.0f}", f"{lv['ttft_p99_ms']:.0f}",
             f"{lv['itl_p50_ms']:.1f}", f"{lv['itl_p99_ms']:.1f}", f"{lv['frontend_cpu_s_per_1k_tokens']:.2f}",
             str(lv["errors"])] for server, levels in by_server.items() for c, lv in sorted(levels.items()))
    serving = fill("cpu_serving", table=table(["server", "streams", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
                                               "ITL p50 ms", "ITL p99 ms", "front-end CPU s / 1k tok", "errors"],
                                              rows), failures=_unfinished(results["servers"], "server"))
    ours = by_server.get("ours", {})
    ratios = []
    for other, theirs in by_server.items():
        common = sorted(set(ours) & set(theirs)) if other != "ours" else []
        if common:
            keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                    "frontend_cpu_s_per_1k_tokens")
            ratios.append(fill("cpu_ratios", other=other, table=table(
                ["streams", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "front-end CPU per token"],
                ([str(c), *(f"{_ratio(ours[c], theirs[c], key):.2f}" for key in keys)] for c in common))))
    return paragraphs(serving, *ratios)


def ab_section(results: dict) -> str:
    ab = next((s.get("ab") for s in results["servers"] if s["server"] == "ours" and s.get("ab")), None)
    if not ab:
        return ""
    rows = ([label, f"{ab[key]:.2f}", f"{ab[key] / ab['one_generate']:.2f}x"] for key, label in AB_CALLS.items())
    return fill("ab_cost", repeats=ab["repeats"], tokens=results["workload"]["output_tokens"],
                table=table(["call", "seconds", "vs one Generate"], rows))


def detection_section(d: dict) -> str:
    return fill("detection", eval_tokens=d["eval_tokens"], candidates=d["candidates"],
                seconds=f"{d['detect_no_cache_seconds']:.1f}", forward_ms=f"{1000 * d['forward_pass_seconds']:.1f}",
                note=fill("detection_note", note=d["note"]) if d.get("note") else "")


def limits_section(lim: dict, by_server: dict[str, dict[int, dict]], dtype: str) -> str:
    threads = sorted(int(k.removeprefix("threads_")) for k in lim if k.startswith("threads_"))
    rows = ([str(n), f"{t['read_bandwidth_gb_s']:.1f}", f"{t['matmul_gflop_s']:.0f}", f"{t['batch1_ceiling_tok_s']:.1f}",
             f"{t['compute_ceiling_tok_s']:.0f}"] for n in threads for t in [lim[f"threads_{n}"]])
    one_thread = lim[f"threads_{threads[0]}"]
    servers = []
    for s, levels in by_server.items():
        if levels:
            one, best = levels.get(1, {}).get("tokens_per_s", float("nan")), max(lv["tokens_per_s"]
                                                                                   for lv in levels.values())
            servers.append(fill("limits_server", server=s, one=f"{one:.1f}", best=f"{best:.1f}",
                                bandwidth_share=f"{100 * one / one_thread['batch1_ceiling_tok_s']:.0f}",
                                compute_share=f"{100 * best / one_thread['compute_ceiling_tok_s']:.0f}"))
    return fill("limits", weight_mb=f"{lim['weight_bytes'] / 1e6:.0f}", dtype=dtype,
                params_m=f"{lim['params'] / 1e6:.1f}", servers="\n".join(servers),
                table=table(["torch threads", "read bandwidth GB/s", "matmul GFLOP/s", "batch-1 ceiling tok/s",
                             "compute ceiling tok/s"], rows))


def gap_section(by_server: dict[str, dict[int, dict]], out_dir: Path) -> str:
    """Where ours is slower than vLLM's OpenAI server, and what the zero-adapter test and the profile say."""
    ours, theirs = by_server.get("ours", {}), by_server.get("vllm-openai", {})
    slower = [c for c in sorted(set(ours) & set(theirs)) if ours[c]["tokens_per_s"] < theirs[c]["tokens_per_s"]]
    if not slower:
        return ""
    gap = fill("gap", slower=", ".join(fill("gap_level", streams=c, ratio=f"{_ratio(ours[c], theirs[c], 'tokens_per_s'):.2f}")
                                       for c in slower))
    zero, profile = _json(out_dir / "zero_adapter.json"), _json(out_dir / "profile.json")
    if zero:
        rates = {k: sum(v) / len(v) for k, v in zero["tokens_per_s"].items()}
        plain, zero_rate = rates["no adapter (unsafe on CPU)"], rates["zero adapter (ours)"]
        gap = paragraphs(gap, fill("zero_adapter", concurrency=zero["concurrency"], tokens=zero["tokens"],
                                   plain=f"{plain:.1f}", zero=f"{zero_rate:.1f}", ratio=f"{zero_rate / plain:.2f}"))
    if profile:
        level = profile["level"]
        top = ", ".join(fill("profile_frame", share=f"{100 * t['share']:.0f}", frame=t["frame"])
                        for t in profile["top"][:3])
        gap = paragraphs(gap, fill("profile", streams=level["concurrency"], samples=profile["samples"], top=top,
                                   cpu=f"{level['frontend_cpu_s_per_1k_tokens']:.2f}"))
    return gap


# -- the default model on a GPU ----------------------------------------------------------------------------------
def gpu_section(runs: list[dict]) -> str:
    if not runs:
        return ""
    first = runs[0]
    servers = {s["server"]: s for run in runs for s in run["servers"]}
    by_server = _by_level(list(servers.values()), "server")
    modules = next((_flags(s["command"]).get("--lora-target-modules") for s in servers.values()
                    if s["server"] == "vllm-openai"), None)
    rows = ([name, str(c), f"{lv['tokens_per_s']:.0f}", f"{lv['ttft_p50_ms']:.0f}", f"{lv['ttft_p99_ms']:.0f}",
             f"{lv['itl_p50_ms']:.2f}", str(lv["errors"])] for name, levels in by_server.items()
            for c, lv in levels.items())
    ours = by_server.get("ours", {})
    ratios = []
    for other in ("vllm-openai", "vllm-openai-nolora"):
        theirs = by_server.get(other, {})
        common = sorted(set(ours) & set(theirs))
        if common:
            ratios.append(fill("gpu_ratios", other=other, levels=", ".join(
                fill("gpu_ratio_level", streams=c, tok=f"{_ratio(ours[c], theirs[c], 'tokens_per_s'):.2f}",
                     ttft=f"{_ratio(ours[c], theirs[c], 'ttft_p50_ms'):.2f}") for c in common)))
    lora, plain = by_server.get("vllm-openai", {}), by_server.get("vllm-openai-nolora", {})
    common = sorted(set(lora) & set(plain))
    lora_cost = fill("gpu_lora_cost", levels=_each_level(
        {c: f"{_ratio(lora[c], plain[c], 'tokens_per_s'):.2f}" for c in common})) if common else ""
    checks, ab = servers.get("ours", {}).get("checks"), servers.get("ours", {}).get("ab")
    return fill("gpu", date=first["date"], gpu=first["gpu"], vllm=first["vllm"], torch=first["torch"],
                tokens=first["tokens"],
                per_client=_requests_per_client(next(s["levels"] for s in servers.values() if s["levels"])),
                lora_target=fill("lora_target", modules=" ".join(modules)) if modules else "",
                table=table(["server", "streams", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "errors"], rows),
                failures=_unfinished(list(servers.values()), "server"), ratios=paragraphs(*ratios),
                lora_cost=lora_cost,
                checks=fill("gpu_checks", engine=checks["engine"], device=checks["device"], dtype=checks["dtype"],
                            super_weights=checks["super_weights"], base=repr(checks["base_arm_text"]),
                            removed=repr(checks["no_super_weights_text"]),
                            equal=checks["base_arm_equals_base_alone"]) if checks else "",
                ab=fill("gpu_ab", tokens=first["tokens"], one=f"{ab['one_generate']:.2f}",
                        compare=f"{ab['compare_two_arms']:.2f}", two=f"{ab['two_generates']:.2f}") if ab else "")


def lora_scope_section(results: list[dict], earlier_runs: list[dict]) -> str:
    """LoRA's reach against base traffic, and how its every-module row compares with an earlier measurement."""
    if not results:
        return ""
    by = {r["config"]: r for r in results}
    off = by["off"]["tok_s"]
    batches = list(off)
    rows = ([label, *(f"{by[name]['tok_s'][k]:,.0f}" for k in batches),
             " / ".join(f"{by[name]['tok_s'][k] / off[k]:.2f}" for k in batches)]
            for name, label in LORA_LABELS.items() if name in by)
    notes = [r["note"] for r in results if r.get("note")]
    earlier = next((r for r in earlier_runs if r["config"] == "all"), None)
    if earlier and "all" in by:
        then, now = earlier["tok_s"], by["all"]["tok_s"]
        spread = max(max(then[k], now[k]) / min(then[k], now[k]) for k in batches) - 1
        notes.append(fill("lora_scope_earlier", source=earlier["source"], spread=f"{100 * spread:.0f}",
                          tok=" / ".join(f"{then[k]:,.0f}" for k in batches)))
    return fill("lora_scope", gpu=_short(_distinct(results, "gpu")), vllm=_distinct(results, "vllm"),
                tokens=_distinct(results, "tokens"), date=_distinct(results, "date"),
                order=", ".join(r["config"] for r in results), notes=" ".join(notes),
                table=table(["LoRA", f"tok/s at {batches[0]}", *batches[1:], f"vs off ({' / '.join(batches)})"], rows,
                            "l" + "r" * len(batches)))


def artifacts_section(results: list[dict]) -> str:
    """Compressed artifacts of the default model through the engine on the GPU."""
    if not results:
        return ""
    by_name = {r["model"]: r for r in results}
    bf16 = by_name.get("bf16", {})
    measured = [r for r in results if "error" not in r]
    probe = measured[0]  # the unquantized model where it was measured: its report values and engine rounding
    streams = list(probe["decode_tok_s"])
    rows = []
    for name, r in by_name.items():
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:160]}", *[""] * (4 + len(streams))])
            continue
        speed = r["decode_tok_s"]
        rows.append([name, f"{r['perplexity']:.2f}",
                     f"{r['offline_float32']['perplexity']:.2f}" if r.get("offline_float32") else "-",
                     f"{r['removed_perplexity']:,.0f}", ", ".join(f"{v:.6f}" for v in r["engine_values"] or []),
                     *(f"{speed[k]:,.0f}" for k in streams),
                     " / ".join(f"{speed[k] / bf16['decode_tok_s'][k]:.2f}" for k in streams)
                     if bf16.get("decode_tok_s") else "-"])
    return fill("artifacts", gpu=_short(_distinct(measured, "gpu")), gpu_name=_distinct(measured, "gpu"),
                vllm=_distinct(measured, "vllm"), eval_tokens=_distinct(measured, "eval_tokens", ","),
                report_values=" and ".join(f"{v:.6f}" for v in probe["report_values"]),
                engine_value=f"{probe['engine_values'][0]:.4f}", tokens=_distinct(measured, "tokens"),
                first_streams=streams[0], date=_distinct(results, "date"),
                table=table(["model", "perplexity (engine)", "offline float32", "no super weights (engine)",
                             "engine values", f"decode tok/s, {streams[0]} stream", *(f"{s} streams" for s in streams[1:]),
                             f"vs bf16 ({' / '.join(streams)})"], rows, "lrrrl" + "r" * len(streams)))


# -- the 8B-shaped model -----------------------------------------------------------------------------------------
def gpu8b_lines(gpu: Path) -> list[str]:
    """BENCHMARKS.md's section on the 8B-shaped model, from whichever of its results exist, as lines."""
    serving, lora, tp, front_ends = (_json(gpu / f"gpu8b_{name}.json") for name in ("serving", "lora", "tp",
                                                                                  "front_ends"))
    quant = [json.loads(p.read_text()) for p in sorted(gpu.glob("gpu8b_quant_*.json"))
             if not p.name.startswith(SIDE_BY_SIDE)]
    side = {p.stem.removeprefix(SIDE_BY_SIDE): json.loads(p.read_text())
            for p in sorted(gpu.glob(f"{SIDE_BY_SIDE}*.json"), key=lambda p: int(p.stem.removeprefix(SIDE_BY_SIDE)))}
    if not (serving or lora or quant or tp or front_ends or side):
        return []
    first = next(r for r in (serving, lora, *quant, tp, front_ends, *side.values()) if r)
    config = {**LLAMA3_8B, **next((r["config"] for r in (serving, *quant) if r and r.get("config")), {})}
    first_lora = _json(gpu / "gpu8b_lora_first.json")
    text = paragraphs(
        fill("gpu_8b", date=first["date"], gpu=first["gpu"], vllm=first["vllm"], torch=first["torch"],
             smg=first.get("smg_grpc_servicer"), super_weights=first["super_weights"],
             architecture=fill("architecture", hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                               layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                               kv_heads=config["num_key_value_heads"], rope_theta=f"{config['rope_theta']:,.0f}")),
        serving_8b_section(serving, gpu) if serving else "",
        serving_8b_earlier(_json(gpu / "gpu8b_serving_first.json")),
        ttft_fix_section(_json(gpu / "ttft_135m.json"), [json.loads(p.read_text()) for p in sorted(gpu.glob("gpu_*.json"))]),
        front_ends_section(front_ends, gpu),
        lora_8b_section(lora, gpu) if lora else fill("lora_8b_not_measured"),
        lora_every_module_section(_json(gpu / "gpu8b_lora_every_module.json"), lora),
        fill("lora_8b_earlier", date=first_lora["date"], table=lora_8b_table(first_lora),
             failures=_unfinished(first_lora["configs"], "config")) if first_lora else "",
        quant_8b_section(quant, gpu, config) if quant else fill("quant_8b_not_measured"),
        quant_side_by_side_section(side, gpu),
        tp_section(tp))
    return document([text]).rstrip("\n").split("\n")


def serving_8b_section(run: dict, gpu: Path) -> str:
    by_arm = _by_level(run["arms"], "arm")
    options = next((a["engine_options"] for a in run["arms"] if a.get("engine_options")), {})
    calls = len(run.get("calls", [None]))
    ratios = []
    for mine, other, key, what in RATIOS_8B:
        ours, theirs = by_arm.get(mine, {}), by_arm.get(other, {})
        common = sorted(c for c in set(ours) & set(theirs) if theirs[c].get(key))
        if common:
            ratios.append(fill("ratio_line", mine=mine, other=other, what=what, levels=_each_level(
                {c: f"{ours[c][key] / theirs[c][key]:.2f}" for c in common})))
    png = plots.gpu_serving(by_arm, gpu, f"8B-shaped, bf16, {_short(run['gpu'] or 'GPU')}")
    return fill("serving_8b", calls=fill("one_call") if calls == 1 else fill("several_calls", calls=calls),
                arms=", ".join(by_arm), tokens=run["tokens"], prompt_tokens=run.get("prompt_tokens", PROMPT_TOKENS),
                per_client=_per_stream(run["per_client"]), options=json.dumps(options),
                table=_level_table(by_arm, ["tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"]),
                failures=_unfinished(run["arms"], "arm"), ratios=paragraphs(*ratios),
                ids_note=fill("ids_note") if "ours-ids" in by_arm else "", goals=goals_8b(by_arm),
                frontend=frontend_8b(by_arm), ttft=ttft_breakdown(by_arm, run), plot=_plot(png))


def goals_8b(by_arm: dict[str, dict[int, dict]]) -> str:
    """Our server's goals, each met or not, where both sides were measured."""
    ids = "ours-ids" if "ours-ids" in by_arm else "ours"  # vLLM's gRPC server returns token ids only
    goals = []
    for mine, other, key, levels, test, goal in (
            ("ours", "offline", "tokens_per_s", [OFFLINE_GOAL_STREAMS], lambda a, b: a >= OFFLINE_SHARE_GOAL * b,
             fill("goal_offline", share=f"{OFFLINE_SHARE_GOAL:g}", level=OFFLINE_GOAL_STREAMS)),
            (ids, "vllm-grpc", "tokens_per_s", None, lambda a, b: a >= b, fill("goal_grpc", arm=ids)),
            ("ours", "vllm-openai", "ttft_p50_ms", None, lambda a, b: a <= b, fill("goal_ttft"))):
        ours, theirs = by_arm.get(mine, {}), by_arm.get(other, {})
        common = [c for c in (levels or sorted(set(ours) & set(theirs))) if c in ours and c in theirs
                  and theirs[c].get(key) is not None and ours[c].get(key) is not None]
        if common:
            missed = [c for c in common if not test(ours[c][key], theirs[c][key])]
            verdict = fill("not_met_at", levels=", ".join(map(str, missed))) if missed else fill("met")
            goals.append(fill("verdict", goal=goal, verdict=verdict))
    return fill("goals", goals="; ".join(goals)) if goals else ""


def frontend_8b(by_arm: dict[str, dict[int, dict]]) -> str:
    """At the top level, the front-end process's share: text against token ids, servicer against client TTFT."""
    top = max((c for levels in by_arm.values() for c in levels), default=None)
    text, ids, offline, openai = (by_arm.get(a, {}).get(top) for a in ("ours", "ours-ids", "offline", "vllm-openai"))
    served = ((text or {}).get("server_side") or {}).get("servicer_ttft", {}).get("mean_ms")
    if not (text and ids and offline and served is not None):
        return ""
    return fill("frontend", streams=top, text=f"{text['tokens_per_s'] / offline['tokens_per_s']:.2f}",
                ids=f"{ids['tokens_per_s'] / offline['tokens_per_s']:.2f}", servicer=f"{served:.0f}",
                client=f"{text['ttft_p50_ms']:.0f}",
                openai=fill("frontend_openai", ratio=f"{openai['tokens_per_s'] / offline['tokens_per_s']:.2f}")
                if openai else "")


def ttft_breakdown(by_arm: dict[str, dict], run: dict) -> str:
    """Client TTFT against where the servers say the time went (vLLM's histograms, our servicer's). A level is keyed
    by its streams, or by (streams, run) where each level ran more than once (a run column then)."""
    rows = [(arm, key, lv) for arm, levels in by_arm.items() for key, lv in sorted(levels.items())
            if lv.get("server_side")]
    if not rows:
        return ""
    runs = isinstance(rows[0][1], tuple)
    empty = "ours" in by_arm and not any(lv.get("server_side", {}).get("peak", {}).get("running")
                                         for lv in by_arm["ours"].values())
    cells = []
    for arm, key, lv in rows:
        s, peak = lv["server_side"], lv["server_side"].get("peak", {})
        mean = {k: s[k]["mean_ms"] if k in s else None for k in
                ("servicer_ttft", "engine_ttft", "engine_queue", "engine_prefill")}
        cells.append([arm, *map(str, key if runs else (key,)), _ms(lv.get("ttft_p50_ms")),
                      *(_ms(v) for v in mean.values()),
                      *(f"{peak.get(k, 0):.0f}" for k in ("running", "waiting", "admission_queued"))])
    return fill("ttft_breakdown", poll=f"{POLL_INTERVAL_S:g}",
                note=fill("ttft_columns_empty", vllm=run["vllm"]) if empty else "",
                table=table(["arm", "streams", *(["run"] if runs else []), "client TTFT p50 ms", "servicer TTFT ms",
                             "engine TTFT ms", "engine queue ms", "engine prefill ms", "running peak", "waiting peak",
                             "our queue peak"], cells, "lr" + "r" * (8 + runs)))


OFFLINE_PREFILL_MARGIN = 1.1  # ours' engine prefill "no longer than the offline engine's": at most 10% above it


def ttft_gap(runs: dict[str, dict[tuple[int, int], dict]], pairs: list[tuple[str, str]]) -> str:
    """Where ours' TTFT gap to the other server sits, at the levels where ours' is longer: inside the engine core
    (vLLM's prefill time, the same engine options on both) or between the engine and the client (the rest); and
    ours' prefill against the offline engine's, the same engine with no server in front of it."""
    def prefill(lv: dict) -> float | None:
        return lv.get("server_side", {}).get("engine_prefill", {}).get("mean_ms")

    offline = runs.get("offline", {})
    lines, longer, within = [], 0, 0
    for mine, other in pairs:
        for (c, r), lv in sorted(runs[mine].items()):
            theirs = runs[other].get((c, r), {})
            ours_p, theirs_p, offline_p = prefill(lv), prefill(theirs), prefill(offline.get((c, r), {}))
            if not (lv.get("ttft_p50_ms") and theirs.get("ttft_p50_ms") and ours_p is not None
                    and theirs_p is not None) or lv["ttft_p50_ms"] <= theirs["ttft_p50_ms"]:
                continue
            gap, more = lv["ttft_p50_ms"] - theirs["ttft_p50_ms"], ours_p - theirs_p
            longer += more > 0
            within += more > 0 and offline_p is not None and ours_p <= OFFLINE_PREFILL_MARGIN * offline_p
            lines.append(fill("ttft_gap_level", mine=mine, other=other, streams=c, run=r, gap=f"{gap:.1f}",
                              prefill=f"{more:+.1f}", rest=f"{gap - more:+.1f}", ours=f"{ours_p:.1f}",
                              theirs=f"{theirs_p:.1f}", offline="-" if offline_p is None else f"{offline_p:.1f}"))
    return fill("ttft_gap", levels="\n".join(lines), longer=longer, of=len(lines), within=within,
                margin=f"{100 * (OFFLINE_PREFILL_MARGIN - 1):.0f}") if lines else ""


def serving_8b_earlier(run: dict | None) -> str:
    """An earlier side-by-side run with fewer requests per stream (its `ours-engine-context` arm shows the
    scheduler fix below)."""
    if not run:
        return ""
    return fill("serving_8b_earlier", date=run["date"], per_client=_per_stream(run["per_client"]),
                table=_level_table(_by_level(run["arms"], "arm"), ["tok/s", "TTFT p50 ms", "TTFT p99 ms"]))


def ttft_fix_section(run: dict | None, gpu_runs: list[dict]) -> str:
    """The scheduler fix measured where the TTFT gap was first seen: the 135M model at its top level."""
    before = _by_level([s for r in gpu_runs for s in r["servers"]], "server")
    ours_then, theirs_then = before.get("ours", {}), before.get("vllm-openai", {})
    levels_then = sorted(set(ours_then) & set(theirs_then))
    if not (run and levels_then):
        return ""
    top = levels_then[-1]
    by_arm = _by_level(run["arms"], "arm")
    ours, theirs = by_arm.get("ours", {}), by_arm.get("vllm-openai", {})
    ratios = {c: fill("ttft_fix_level", streams=c, tok=f"{_ratio(ours[c], theirs[c], 'tokens_per_s'):.2f}",
                      ttft=f"{_ratio(ours[c], theirs[c], 'ttft_p50_ms'):.2f}") for c in sorted(set(ours) & set(theirs))}
    return fill("ttft_fix", streams=top, ours=f"{ours_then[top]['ttft_p50_ms']:.0f}",
                theirs=f"{theirs_then[top]['ttft_p50_ms']:.0f}",
                ratio=f"{_ratio(ours_then[top], theirs_then[top], 'ttft_p50_ms'):.1f}",
                old_seqs=f"{ENGINE_CONTEXT_SCHEDULER['max_num_seqs']:,}",
                old_tokens=f"{ENGINE_CONTEXT_SCHEDULER['max_num_batched_tokens']:,}",
                seqs=f"{SCHEDULER['max_num_seqs']:,}", tokens_per_step=f"{SCHEDULER['max_num_batched_tokens']:,}",
                date=run["date"], gpu=run["gpu"], tokens=run["tokens"],
                per_client=_per_stream({k: v for k, v in run["per_client"].items() if int(k) in run["levels"]}),
                table=_level_table(by_arm, ["tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]),
                ratios=fill("ttft_fix_ratios", levels=", ".join(ratios.values())) if ratios else "")


# -- several front ends on one engine core -----------------------------------------------------------------------
def _by_run(entries: list[dict], key: str, levels: str = "levels") -> dict[str, dict[tuple[int, int], dict]]:
    """{entry[key]: {(streams, run): level}} of the entries that measured something, in their order."""
    return {e[key]: {(lv["concurrency"], lv.get("run", 1)): lv for lv in e[levels]} for e in entries if e.get(levels)}


def _and(items: list) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(i) for i in items]
    return " and ".join(filter(None, [", ".join(items[:-1]), *items[-1:]]))


def _at_levels(values: dict[int, str]) -> str:
    """'0.988 at 256 and 0.997 at 512'."""
    return _and([fill("at_level", value=v, level=c) for c, v in values.items()])


def _runs_verdict(ok: dict[int, bool]) -> str:
    """met / not met / met in run 1, not in run 2."""
    if all(ok.values()):
        return fill("met")
    if not any(ok.values()):
        return fill("not_met")
    return fill("met_in_runs", met=_and([r for r, v in ok.items() if v]), missed=_and([r for r, v in ok.items() if not v]))


def _shell_options(options: dict) -> list[str]:
    """The --engine-option arguments that give `options`, quoted for the shell."""
    return [f"--engine-option '{k}={json.dumps(v, separators=(',', ':'))}'" for k, v in options.items()]


def _tokenizer_dir(config: dict) -> str:
    """The directory whose tokenizer benchmarks.model_8b gave the model, from the name it wrote into config.json."""
    match = re.search(r"\((.+) tokenizer\)", config.get("_name_or_path", ""))
    return match.group(1) if match else "TOKENIZER_DIR"


def front_ends_section(run: dict | None, gpu: Path) -> str:
    """Several front-end processes on one engine core (ARM@N), each level run more than once, every run shown."""
    if not run:
        return ""
    runs = _by_run(run["arms"], "arm")
    measured = [a for a in run["arms"] if a.get("levels")]
    servers = {a["arm"]: front_ends_of(a["arm"]) for a in run["arms"] if a["arm"] != "offline"}
    offline = runs.get("offline", {})
    streams = sorted({c for levels in runs.values() for c, _ in levels})
    repeat = max(r for levels in runs.values() for _, r in levels)
    first = runs[measured[0]["arm"]]
    per_stream = {c: first[(c, 1)]["requests"] // c for c in streams if (c, 1) in first}
    client_processes = _distinct([a for a in measured if "client_processes" in a], "client_processes")
    options = next((a["engine_options"] for a in measured if a.get("engine_options")), {})
    flags = [["--arms", *(a["arm"] for a in run["arms"])], ["--levels", *map(str, run["levels"]), "--repeat", str(repeat),
             "--client-processes", client_processes, "--budget-s", f"{run['budget_s']:g}"],
             _shell_options(run["model"]["extra"])]
    pairs = [(mine, other) for mine, (name, n) in servers.items() for other, (theirs, m) in servers.items()
             if name == "ours" and theirs == "vllm-openai" and n == m and mine in runs and other in runs]
    tables = [fill("front_ends_level", streams=c, table=table(
        ["arm", "run", "tok/s", "x offline", "TTFT p50 ms", "ITL p50 ms", "front-end CPU s / 1k tok", "tokens / message"],
        ([arm, str(r), f"{lv['tokens_per_s']:,.0f}",
          f"{_ratio(lv, offline[(c, r)], 'tokens_per_s'):.2f}" if (c, r) in offline else "-",
          _ms(lv.get("ttft_p50_ms")), _ms(lv.get("itl_p50_ms"), ".2f"), _ms(lv.get("frontend_cpu_s_per_1k_tokens"), ".3f"),
          _ms(lv.get("tokens_per_message"), ".3f")] for arm, levels in runs.items()
         for (s, r), lv in sorted(levels.items()) if s == c), "lr" + "r" * 6)) for c in streams]
    ratios = [fill("front_ends_ratios", mine=mine, other=other, table=table(
        ["streams", "run", "tok/s", "TTFT p50", "ITL p50", "front-end CPU per token"],
        ([str(c), str(r), *(f"{_ratio(lv, runs[other][(c, r)], k):.3f}" if lv.get(k) and runs[other][(c, r)].get(k)
                            else "-" for k in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms",
                                               "frontend_cpu_s_per_1k_tokens"))]
         for (c, r), lv in sorted(runs[mine].items()) if (c, r) in runs[other]), "rrrrrr"))
        for mine, other in pairs]
    counts = {servers[a["arm"]][1] for a in measured if a["arm"] in servers}
    skipped = [a["arm"] for a in run["arms"] if a.get("skipped") and a["arm"] in servers
               and servers[a["arm"]][1] not in counts]
    absent = [n for n in FRONT_END_COUNTS if n not in {n for _, n in servers.values()}]
    not_run = [fill("ids_not_run")] if not any(name == "ours-ids" for name, _ in servers.values()) else []
    not_run += [fill("counts_not_run", counts=_and(absent))] if absent else []
    png = plots.front_ends({arm: {c: [lv["tokens_per_s"] for (s, _), lv in sorted(levels.items()) if s == c]
                                  for c in streams} for arm, levels in runs.items()},
                           {arm: {c: [_ratio(lv, offline[(s, r)], "tokens_per_s") for (s, r), lv in sorted(levels.items())
                                      if s == c and (s, r) in offline] for c in streams}
                            for arm, levels in runs.items() if arm != "offline"},
                           OFFLINE_SHARE_GOAL, gpu, f"8B-shaped, bf16, {_short(run['gpu'])}")
    return fill("front_ends", date=run["date"], gpu=run["gpu"], vllm=run["vllm"], torch=run["torch"],
                arms=", ".join(f"`{a['arm']}`" for a in run["arms"]), tokens=run["tokens"],
                prompt_tokens=run["prompt_tokens"], per_client=_per_stream(per_stream), repeat=repeat,
                client_processes=client_processes, options=json.dumps(options), vocab=f"{run['config']['vocab_size']:,}",
                tokenizer=_tokenizer_dir(run["config"]), model=run["model"]["path"],
                args=" \\\n#     ".join(" ".join(f) for f in flags if f),
                commands="\n".join(fill("front_ends_command", arm=a["arm"], command=a["command"])
                                   for a in measured if a.get("command")),
                failures=_unfinished(run["arms"], "arm"),
                skipped=fill("front_ends_skipped", arms=_and([f"`{a}`" for a in skipped]), client_processes=client_processes,
                             counts=_and(sorted({servers[a][1] for a in skipped}))) if skipped else "",
                not_run=fill("front_ends_not_run", what=_and(not_run)) if not_run else "",
                levels=paragraphs(*tables), ratios=paragraphs(*ratios),
                spread=_run_spread(runs) if repeat > 1 else "",
                goals=front_end_goals(runs, servers, pairs, run["tokens"]),
                breakdown=paragraphs(ttft_breakdown(runs, run), ttft_gap(runs, pairs)),
                plot=_plot(png))


def _run_spread(runs: dict[str, dict[tuple[int, int], dict]]) -> str:
    """How far apart two runs of one arm at one level are, at the most: the noise the verdicts sit in."""
    return fill("front_ends_spread", spreads=_spreads(runs))


def _spreads(runs: dict[str, dict[tuple[int, int], dict]]) -> str:
    """The largest run-to-run difference of one arm at one level, in tok/s and in TTFT p50, as text."""
    found = {}
    for key, what in (("tokens_per_s", "tok/s"), ("ttft_p50_ms", "TTFT p50")):
        values = {(arm, c): [lv[key] for (s, _), lv in levels.items() if s == c and lv.get(key)]
                  for arm, levels in runs.items() for c, _ in levels}
        found[what] = max((((max(v) - min(v)) / (sum(v) / len(v)), arm, c) for (arm, c), v in values.items()
                           if len(v) > 1), default=None)
    return _and([fill("spread_of", what=what, share=f"{100 * s:.0f}", arm=arm, streams=c)
                 for what, (s, arm, c) in ((w, f) for w, f in found.items() if f)])


def front_end_goals(runs: dict[str, dict[tuple[int, int], dict]], servers: dict[str, tuple[str, int]],
                    pairs: list[tuple[str, str]], tokens: int) -> str:
    """Our front ends' goals, run by run: a share of the offline engine at the top levels, vLLM's OpenAI server
    with as many front ends at every level, and ITL at one stream against the offline engine's step."""
    offline, goals = runs.get("offline", {}), []
    run_ids = sorted({r for levels in runs.values() for _, r in levels})
    for arm in (a for a, (name, _) in servers.items() if name == "ours" and a in runs):
        ours = runs[arm]
        shares = {r: {c: _ratio(ours[(c, r)], offline[(c, r)], "tokens_per_s") for c in FRONT_ENDS_OFFLINE_STREAMS
                      if (c, r) in ours and (c, r) in offline} for r in run_ids}
        if any(shares.values()):
            goals.append(fill("goal_offline_share", arm=arm, share=f"{OFFLINE_SHARE_GOAL:g}",
                              levels=_and(FRONT_ENDS_OFFLINE_STREAMS), runs="; ".join(
                fill("run_values", run=r, values=_at_levels({c: f"{v:.3f}" for c, v in s.items()}),
                     verdict=fill("met") if all(v >= OFFLINE_SHARE_GOAL for v in s.values()) else fill("not_met"))
                for r, s in shares.items() if s)))
        for mine, other in (p for p in pairs if p[0] == arm):
            verdicts = []
            for r in run_ids:
                common = sorted(c for c, run in ours if run == r and (c, r) in runs[other])
                if not common:
                    continue
                tok = {c: _ratio(ours[(c, r)], runs[other][(c, r)], "tokens_per_s") for c in common}
                ttft = {c: _ratio(ours[(c, r)], runs[other][(c, r)], "ttft_p50_ms") for c in common}
                low, slow = {c: v for c, v in tok.items() if v < 1}, {c: v for c, v in ttft.items() if v > 1}
                missed = [fill("tok_below", levels=_at_levels({c: f"{v:.3f}x" for c, v in low.items()}))] if low else []
                missed += [fill("ttft_above", levels=_at_levels({c: f"{v:.3f}x" for c, v in slow.items()}))] if slow else []
                verdicts.append(fill("run_verdict", run=r, verdict=fill("not_met_because", why="; ".join(missed))
                                     if missed else fill("met")))
            if verdicts:
                goals.append(fill("goal_same_front_ends", arm=mine, other=other, runs="; ".join(verdicts)))
        itl = {r: (ours[(ITL_GOAL_STREAMS, r)]["itl_p50_ms"],
                   1000 * offline[(ITL_GOAL_STREAMS, r)]["batch_seconds_median"] / tokens) for r in run_ids
               if (ITL_GOAL_STREAMS, r) in ours and (ITL_GOAL_STREAMS, r) in offline
               and ours[(ITL_GOAL_STREAMS, r)].get("itl_p50_ms") is not None}
        if itl:
            goals.append(fill("goal_itl_step", arm=arm, streams=ITL_GOAL_STREAMS, tolerance=f"{ITL_STEP_GOAL_MS:g}",
                              tokens=tokens, runs="; ".join(
                fill("run_values", run=r, values=fill("itl_against_step", itl=f"{a:.2f}", step=f"{b:.2f}",
                                                      apart=f"{abs(a - b):.2f}"),
                     verdict=fill("met") if abs(a - b) <= ITL_STEP_GOAL_MS else fill("not_met"))
                for r, (a, b) in itl.items())))
    return fill("front_ends_goals", goals="\n".join(goals)) if goals else ""


def _lora_configs(run: dict) -> tuple[dict[str, dict], dict[int, float]]:
    """The configurations that measured base traffic, and LoRA off's tok/s by batch."""
    configs = {c["config"]: c for c in run["configs"] if c.get("base")}
    return configs, {lv["concurrency"]: lv["tokens_per_s"] for lv in configs.get("off", {}).get("base", [])}


def _mixed_share(config: dict) -> dict[int, float]:
    """Mixed traffic's tok/s over the same configuration's base traffic, by batch: what the arms cost within one
    engine, whatever else ran in the call."""
    base = {lv["concurrency"]: lv["tokens_per_s"] for lv in config.get("base", [])}
    return {lv["concurrency"]: lv["tokens_per_s"] / base[lv["concurrency"]] for lv in config.get("mixed", [])
            if lv["concurrency"] in base}


def lora_8b_table(run: dict) -> str:
    configs, off = _lora_configs(run)
    batches = sorted({lv["concurrency"] for c in configs.values() for lv in c["base"]})
    rows = []
    for name, label in LORA_LABELS.items():
        for kind in ("base", "mixed") if name in configs else ():
            tok = {lv["concurrency"]: lv["tokens_per_s"] for lv in configs[name].get(kind, [])}
            if tok:
                vs = " / ".join(f"{tok[b] / off[b]:.2f}" for b in batches if b in tok and b in off) or "-"
                share = " / ".join(f"{v:.2f}" for _, v in sorted(_mixed_share(configs[name]).items()))
                rows.append([label, kind, *(f"{tok[b]:,.0f}" if b in tok else "-" for b in batches), vs,
                             share if kind == "mixed" and share else "-"])
    return table(["LoRA", "requests", *(f"tok/s at {b}" for b in batches), "vs off", "mixed / base"], rows,
                 "ll" + "r" * (len(batches) + 2))


def lora_every_module_section(run: dict | None, main: dict | None) -> str:
    """LoRA on every module with the mixed warm-up, in a call of its own, against down_proj only in the main run:
    each configuration's mixed traffic over its own base traffic (a ratio taken within one call)."""
    if not run:
        return ""
    shares = {}  # configuration -> (its mixed / base by batch, the run it comes from), this call's first
    for source in filter(None, (run, main)):
        for name, config in _lora_configs(source)[0].items():
            share = _mixed_share(config)
            if share and name not in shares:
                shares[name] = (share, source)
    compare = ""
    if {"all", "down_proj"} <= set(shares):
        (every, a), (down, b) = shares["all"], shares["down_proj"]
        batches = sorted(set(every) & set(down))
        compare = fill("lora_every_module_compare", batches=" / ".join(map(str, batches)),
                       every=" / ".join(f"{every[c]:.2f}" for c in batches),
                       down=" / ".join(f"{down[c]:.2f}" for c in batches),
                       every_call=f"{a['date']}, {_short(a['gpu'])}", down_call=f"{b['date']}, {_short(b['gpu'])}")
    return fill("lora_every_module", date=run["date"], gpu=run["gpu"],
                configs=", ".join(f"`{c['config']}`" for c in run["configs"]), table=lora_8b_table(run),
                failures=_unfinished(run["configs"], "config"), compare=compare)


def lora_8b_section(run: dict, gpu: Path) -> str:
    configs, off = _lora_configs(run)
    warm = {n: c for n, c in configs.items() if "mixed_warmup_seconds" in c}
    warm_up = fill("lora_warm_up", warm_ups=", ".join(
        fill("lora_warm_up_config", seconds=f"{c['mixed_warmup_seconds']:.1f}", config=n,
             warm=f"{sum(lv['batch_seconds_median'] for lv in c['mixed']):.1f}") for n, c in warm.items())) \
        if warm else fill("lora_no_warm_up")
    ratios = {f"{LORA_LABELS.get(name, name)}, {kind}": {lv["concurrency"]: lv["tokens_per_s"] / off[lv["concurrency"]]
                                                        for lv in c.get(kind, []) if lv["concurrency"] in off}
              for name, c in configs.items() for kind in ("base", "mixed")}
    return fill("lora_8b", tokens=run["tokens"], rounds=run["rounds"], mix=f"{100 * run['mix']:.0f}",
                rank=len(run["super_weights"].split(",")), warm_up=warm_up, table=lora_8b_table(run),
                failures=_unfinished(run["configs"], "config"),
                plot=_plot(plots.lora_cost(ratios, gpu, _short(run["gpu"]))))


def quant_8b_section(runs: list[dict], gpu: Path, config: dict) -> str:
    entries = [e for r in runs for e in r["models"]]
    by_name = {e["model"]: e for e in entries if e.get("decode")}
    tok = {name: {lv["concurrency"]: lv["tokens_per_s"] for lv in e["decode"]} for name, e in by_name.items()}
    bf16 = tok.get("bf16", {})
    streams = sorted({c for values in tok.values() for c in values})
    rows = ([name, *(f"{tok[name][s]:,.0f}" if s in tok[name] else "-" for s in streams),
             " / ".join(f"{tok[name][s] / bf16[s]:.2f}" for s in streams if s in tok[name] and s in bf16) or "-",
             ", ".join("-" if v is None else f"{v:.4f}" for v in e.get("engine_values") or []),
             f"{e['startup_seconds']:.0f}"] for name, e in by_name.items())
    planted = next((r["planted"] for r in runs if r.get("planted") is not None), None)
    goal = reading = ""
    if "w4a16" in tok and 1 in bf16:
        w4 = tok["w4a16"][1]
        goal = fill("quant_goal", ratio=f"{w4 / bf16[1]:.2f}", goal=f"{W4A16_SPEEDUP_GOAL:g}",
                    verdict=fill("met") if w4 >= W4A16_SPEEDUP_GOAL * bf16[1] else fill("not_met"))
        sizes = {m["scheme"]: m["bytes"] for r in runs for m in r.get("make", {}).get("made", []) if "scheme" in m}
        reading = quant_reading(bf16[1], w4, sizes.get("w4a16"), config, _short(runs[0]["gpu"]))
    ratios = {name: {c: v / bf16[c] for c, v in values.items() if c in bf16} for name, values in tok.items()}
    return fill("quant_8b", weights=_distinct(runs, "weights"), tokens=_distinct(runs, "tokens"),
                planted=fill("quant_planted", planted=f"{planted:g}") if planted is not None else ".",
                table=table(["model", *(f"decode tok/s, {s} streams" for s in streams), "vs bf16", "engine values",
                             "start s"], rows, "l" + "r" * (len(streams) + 1) + "lr"),
                goal=goal, reading=reading, failures=_unfinished(entries, "model"),
                plot=_plot(plots.quantized_decode(ratios, gpu, _short(runs[0]["gpu"]))))


def quant_reading(bf16_tok_s: float, w4_tok_s: float, w4_bytes: int | None, config: dict, gpu: str) -> str:
    """Batch-1 step times against the time the step's weight reads take at the GPU's bandwidth (arithmetic)."""
    if w4_bytes is None or gpu not in READ_BANDWIDTH_TB_S:
        return ""
    embed = 2 * config["vocab_size"] * config["hidden_size"]  # bf16 bytes of the embedding, read one row a step
    read = {"bf16": 2 * llama_parameters(config) - embed, "w4a16": w4_bytes - embed}
    ms = {k: v / (READ_BANDWIDTH_TB_S[gpu] * 1e12) * 1e3 for k, v in read.items()}
    step = {"bf16": 1e3 / bf16_tok_s, "w4a16": 1e3 / w4_tok_s}
    return fill("quant_reading", bf16_step=f"{step['bf16']:.1f}", w4_step=f"{step['w4a16']:.1f}", gpu=gpu,
                bandwidth=f"{READ_BANDWIDTH_TB_S[gpu]:g}", bf16_read=f"{ms['bf16']:.1f}",
                bf16_gb=f"{read['bf16'] / 1e9:.1f}", w4_read=f"{ms['w4a16']:.1f}", w4_gb=f"{read['w4a16'] / 1e9:.1f}",
                vocab=f"{config['vocab_size']:,}", overhead=f"{step['bf16'] - ms['bf16']:.1f}",
                w4_beyond=f"{step['w4a16'] - ms['w4a16']:.1f}")


def llama_parameters(config: dict) -> int:
    """Parameters of a Llama-architecture config (untied LM head unless it says tied; norms included)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    heads = 1 if config.get("tie_word_embeddings") else 2
    return n * layer + heads * config["vocab_size"] * h + h


# -- quantized decode side by side with plain vLLM ---------------------------------------------------------------
def _reference(name: str, models: dict) -> str:
    """The bf16 a model is held against in its call: LoRA off against bf16-nolora where the call has it."""
    _, _, lora = variant(name)
    return "bf16-nolora" if not lora and name != "bf16-nolora" and "bf16-nolora" in models else "bf16"


def _plain(name: str, models: dict) -> str | None:
    """plain-S of ours S or S-nolora, where the same call measured it."""
    scheme, ours, _ = variant(name)
    return f"plain-{scheme}" if scheme and ours and f"plain-{scheme}" in models else None


def _run_ratios(mine: dict[tuple[int, int], dict], theirs: dict[tuple[int, int], dict], streams: int) -> dict[int, float]:
    """{run: mine / theirs tok/s} at `streams`, run N against run N."""
    return {r: _ratio(lv, theirs[(c, r)], "tokens_per_s") for (c, r), lv in sorted(mine.items())
            if c == streams and (c, r) in theirs}


def _slash(values: dict[int, float]) -> str:
    """'1.58 / 1.61': run 1 / run 2."""
    return " / ".join(f"{v:.2f}" for v in values.values()) or "-"


def quant_side_table(models: dict[str, dict[tuple[int, int], dict]], streams: list[int]) -> str:
    rows = []
    for name, levels in models.items():
        reference, plain = _reference(name, models), _plain(name, models)
        rows.append([f"`{name}`", *(" / ".join(f"{lv['tokens_per_s']:,.0f}" for (c, _), lv in sorted(levels.items())
                                              if c == s) for s in streams), f"`{reference}`",
                     *(_slash(_run_ratios(levels, models[reference], s)) if reference in models else "-"
                       for s in streams),
                     *(_slash(_run_ratios(levels, models[plain], s)) if plain else "-" for s in streams)])
    return table(["model", *(f"tok/s, {s} streams" for s in streams), "against", *(f"x, {s} streams" for s in streams),
                  *(f"ours / plain, {s} streams" for s in streams)], rows, "l" + "r" * len(streams) + "l"
                 + "r" * 2 * len(streams))


def quant_side_by_side_section(calls: dict[str, dict], gpu: Path) -> str:
    """Ours (protected, with and without LoRA) against plain vLLM of the same scheme, decode tok/s, each device
    call on its own, and the torch profiler's decode steps of a pair."""
    if not calls:
        return ""
    runs = list(calls.values())
    models = {label: _by_run(run["models"], "model", "decode") for label, run in calls.items()}
    streams = sorted({c for by in models.values() for levels in by.values() for c, _ in levels})
    sections, commands = [], []
    for label, run in calls.items():
        entries = run["models"]
        measured = [e for e in entries if e.get("decode")]
        repeat = max(lv.get("run", 1) for e in measured for lv in e["decode"])
        options = {k: measured[0]["engine_options"][k] for k in GIVEN_OPTIONS if k in measured[0]["engine_options"]}
        profiled = [e["model"] for e in entries if e.get("profile")]
        names = [e["model"] for e in entries]
        flags = [["--config-only"] if run["planted"] is None else [], ["--repeat", str(repeat)] if repeat > 1 else [],
                 ["--profile", *profiled] if profiled else []]
        commands.append(fill("quant_side_call_command", args=" ".join(w for f in flags for w in f),
                             options=" ".join(_shell_options(options)), models=" ".join(names),
                             result=f"gpu8b_quant_{'_'.join(names)}.json", file=f"{SIDE_BY_SIDE}{label}.json"))
        commands += [fill("quant_side_profile_copy", directory=Path(e["profile"]["directory"]).name, model=e["model"])
                     for e in entries if e.get("profile")]
        sections.append(fill("quant_side_call", call=label, date=run["date"], models=", ".join(f"`{n}`" for n in names),
                             table=quant_side_table(models[label], streams), failures=_unfinished(entries, "model")))
    png = plots.quant_side_by_side({fill("call_label", call=label): {name: {c: [lv["tokens_per_s"] for (s, _), lv in
                                                                             sorted(levels.items()) if s == c]
                                                                         for c in streams}
                                                                  for name, levels in by.items()}
                                    for label, by in models.items()}, gpu, _short(runs[0]["gpu"]))
    config = {**LLAMA3_8B, **runs[0]["config"]}
    profiles = {e["model"]: (e["profile"]["steps"], profile_rows(gpu / f"profile_decode_{e['model']}.txt"))
                for run in runs for e in run["models"] if e.get("profile")
                and (gpu / f"profile_decode_{e['model']}.txt").is_file()}
    return fill("quant_side", gpu=_distinct(runs, "gpu"), vllm=_distinct(runs, "vllm"), torch=_distinct(runs, "torch"),
                date=_distinct(runs, "date"), calls=len(calls), weights=_distinct(runs, "weights"),
                tokens=_distinct(runs, "tokens"), rounds=_per_stream(runs[0]["rounds"]),
                commands="\n".join(commands),
                sections=paragraphs(*sections), goals=quant_side_goals(models, streams),
                profile=paragraphs(*(profile_section(name, f"plain-{variant(name)[0]}", profiles, config,
                                                     _short(runs[0]["gpu"]))
                                     for name in profiles if variant(name)[1] and variant(name)[0]
                                     and f"plain-{variant(name)[0]}" in profiles)), plot=_plot(png))


def quant_side_goals(calls: dict[str, dict[str, dict[tuple[int, int], dict]]], streams: list[int]) -> str:
    """Ours protected against plain vLLM of the same scheme (within a call), and the batch-1 speed-ups against bf16,
    ours and plain vLLM's, run by run."""
    schemes = list(dict.fromkeys(variant(n)[0] for by in calls.values() for n in by if variant(n)[0]))
    where = {}  # the first call that measured each model
    for label, by in calls.items():
        for name in by:
            where.setdefault(name, label)
    goals = []
    for scheme in schemes:
        plain = f"plain-{scheme}"
        same = next((label for label, by in calls.items() if scheme in by and plain in by), None)
        if same:
            by = calls[same]
            ratios = {s: _run_ratios(by[scheme], by[plain], s) for s in streams}
            run_ids = sorted({r for v in ratios.values() for r in v})
            ok = {r: all(v[r] >= PLAIN_SHARE_GOAL for v in ratios.values() if r in v) for r in run_ids}
            goals.append(fill("goal_plain_share", ours=scheme, plain=plain, call=same, share=f"{PLAIN_SHARE_GOAL:g}",
                              streams=_and(streams), values=_at_levels({s: _slash(v) for s, v in ratios.items()}),
                              verdict=_runs_verdict(ok)))
        elif scheme in where and plain in where:
            goals.append(fill("goal_plain_other_calls", ours=scheme, plain=plain, share=f"{PLAIN_SHARE_GOAL:g}",
                              values="; ".join(_against_own(name, calls[where[name]], where[name], streams)
                                               for name in (scheme, plain))))
    for scheme, goal in SPEEDUP_GOALS.items():
        found = {}
        for name in (scheme, f"plain-{scheme}"):
            if name in where:
                by = calls[where[name]]
                ratios = _run_ratios(by[name], by[_reference(name, by)], SPEEDUP_GOAL_STREAMS)
                found[name] = fill("speedup_of", name=name, call=where[name], values=_slash(ratios),
                                   reference=_reference(name, by),
                                   verdict=_runs_verdict({r: v >= goal for r, v in ratios.items()}))
        if scheme in found:
            plain = found.get(f"plain-{scheme}")
            goals.append(fill("goal_speedup", scheme=scheme, goal=f"{goal:g}", streams=SPEEDUP_GOAL_STREAMS,
                              ours=found[scheme], plain=fill("goal_speedup_plain", plain=plain) if plain else ""))
    return fill("quant_side_goals", goals="\n".join(goals)) if goals else ""


def _against_own(name: str, by: dict[str, dict[tuple[int, int], dict]], call: str, streams: list[int]) -> str:
    """'`fp8-dynamic` (call 2): 1.48 / 1.48 at 1 and ... x its call's `bf16`'."""
    reference = _reference(name, by)
    return fill("against_own", name=name, call=call, reference=reference, values=_at_levels(
        {s: _slash(_run_ratios(by[name], by[reference], s)) for s in streams}))


PROFILE_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # the profiler's time units, in ms
STEP_ROW = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")  # vLLM's annotation of a step


def profile_rows(path: Path) -> list[dict]:
    """The rows of a torch profiler key_averages table as vLLM writes it: name, self CPU and self CUDA (ms), calls."""
    lines = path.read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    header = re.split(r"\s{2,}", lines[rules[0] + 1].strip())
    rows = []
    for line in lines[rules[1] + 1:rules[2]]:
        name, *values = line.rsplit(None, len(header) - 1)
        cells = dict(zip(header[1:], values))
        rows.append({"name": name.strip(), "calls": int(cells["# of Calls"]),
                     **{key: float(number) * PROFILE_UNITS[unit] for key, column in
                        (("self_cpu_ms", "Self CPU"), ("self_cuda_ms", "Self CUDA"))
                        for number, unit in [re.fullmatch(r"([\d.]+)([a-z]+)", cells[column]).groups()]}})
    return rows


def _gpu_rows(rows: list[dict]) -> list[dict]:
    """Kernels, memsets and copies: rows with GPU time and no CPU time, vLLM's step annotations left out."""
    return [r for r in rows if r["self_cpu_ms"] == 0 and r["self_cuda_ms"] > 0 and not STEP_ROW.fullmatch(r["name"])]


def _step_rows(rows: list[dict]) -> tuple[dict, dict | None]:
    """(the decode steps' row, the prefill's), each the row of its name with the GPU time."""
    steps = {}
    for r in rows:
        if STEP_ROW.fullmatch(r["name"]) and r["self_cuda_ms"] > steps.get(r["name"], {}).get("self_cuda_ms", -1):
            steps[r["name"]] = r
    decode = next(r for n, r in steps.items() if STEP_ROW.fullmatch(n).group(1) == "0")
    return decode, next((r for n, r in steps.items() if STEP_ROW.fullmatch(n).group(1) != "0"), None)


def _row_keys(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """The rows by (name, rank among the rows of that name by calls): the profiler cuts long names, so two kernels
    may share one; the same kernel of two profiles gets the same key."""
    keys = {}
    for r in sorted(rows, key=lambda r: -r["calls"]):
        keys[(r["name"], sum(name == r["name"] for name, _ in keys))] = r
    return keys


def _us_step(row: dict, steps: int) -> str:
    return f"{1000 * row['self_cuda_ms'] / steps:.1f}"


def _only_in(mine: list[dict], theirs: list[dict], steps: int) -> str:
    """The GPU rows of `mine` whose names `theirs` lacks that ran every step, with their time a step; and how many
    more ran less often."""
    names = {r["name"] for r in theirs}
    only = [r for r in mine if r["name"] not in names]
    every = [fill("kernel_step", name=r["name"], us=_us_step(r, steps), calls=f"{r['calls'] / steps:g}")
             for r in only if r["calls"] >= steps]
    rare = [r for r in only if r["calls"] < steps]
    if rare:
        every.append(fill("kernels_rare", count=len(rare), steps=steps,
                          us=f"{sum(1000 * r['self_cuda_ms'] for r in rare) / steps:.1f}"))
    return "; ".join(every)


def profile_section(ours: str, plain: str, profiles: dict[str, tuple[int, list[dict]]], config: dict,
                    gpu: str) -> str:
    """Where a decode step of ours and plain vLLM of one scheme goes, and what limits the int4 GEMM: its time a
    step against the bytes of the int4 weights it reads (arithmetic on the profile)."""
    from superweights.compression.schemes import fit_to_model, get_scheme

    steps, rows = profiles[plain][0], {name: profiles[name][1] for name in (plain, ours)}
    gpu_rows = {name: _gpu_rows(r) for name, r in rows.items()}
    decode, prefill = zip(*(_step_rows(r) for r in rows.values()))
    by_key = {name: _row_keys(gpu_rows[name]) for name in (plain, ours)}
    top = list(dict.fromkeys(key for name in (plain, ours) for key, _ in
                             sorted(by_key[name].items(), key=lambda kv: -kv[1]["self_cuda_ms"])[:PROFILE_TOP]))
    kernels = table(["GPU row", *(f"`{n}` {what}" for n in (plain, ours) for what in ("µs a step", "calls a step"))],
                    ([f"`{key[0]}`", *(cell for n in (plain, ours) for cell in
                                       ((_us_step(by_key[n][key], steps), f"{by_key[n][key]['calls'] / steps:g}")
                                        if key in by_key[n] else ("-", "-")))] for key in top), "lrrrr")
    graphs = {n: sum(r["calls"] for r in rows[n] if r["name"] == "cudaGraphLaunch") for n in (plain, ours)}
    mm = {n: next(r for r in rows[n] if r["name"] == "aten::mm" and r["calls"] == steps) for n in (plain, ours)}
    lm_kernel = next(r for r in gpu_rows[plain] if r["calls"] == steps and r["self_cuda_ms"] == mm[plain]["self_cuda_ms"])
    bandwidth = READ_BANDWIDTH_TB_S.get(gpu)
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    weights = n * (h * (q + 2 * kv) + q * h + 3 * h * i)
    scheme = fit_to_model(get_scheme(variant(ours)[0]), [h, i]).weights
    int4_bytes = weights * scheme.bits / 8 + weights / scheme.group_size * BF16_BYTES
    lm_bytes = config["vocab_size"] * h * BF16_BYTES
    gemm = {name: [r for r in gpu_rows[name] if r["name"].startswith(INT4_GEMM)] for name in (plain, ours)}
    gemm_ms = {name: sum(r["self_cuda_ms"] for r in g) / steps for name, g in gemm.items()}
    gemm_calls = sum(r["calls"] for r in gemm[plain]) / steps
    lm_ms = mm[plain]["self_cuda_ms"] / steps
    tb_s = {"gemm": int4_bytes / (gemm_ms[plain] * 1e-3) / 1e12, "lm": lm_bytes / (lm_ms * 1e-3) / 1e12}
    step_ms = {name: r["self_cuda_ms"] / r["calls"] for name, r in zip((plain, ours), decode)}
    return fill("quant_profile", steps=steps, plain=plain, ours=ours, decode_row=decode[0]["name"],
                decode_calls=decode[0]["calls"],
                prefill=fill("profile_prefill", row=prefill[0]["name"], calls=prefill[0]["calls"],
                             tokens=STEP_ROW.fullmatch(prefill[0]["name"]).group(2)) if prefill[0] else "",
                plain_step=f"{step_ms[plain]:.3f}", ours_step=f"{step_ms[ours]:.3f}",
                delta=f"{step_ms[ours] - step_ms[plain]:+.3f}", delta_share=f"{100 * (step_ms[ours] / step_ms[plain] - 1):+.1f}",
                plain_total=f"{sum(r['self_cuda_ms'] for r in gpu_rows[plain]) / steps:.3f}",
                ours_total=f"{sum(r['self_cuda_ms'] for r in gpu_rows[ours]) / steps:.3f}",
                plain_graphs=graphs[plain], ours_graphs=graphs[ours], top=PROFILE_TOP, table=kernels,
                ours_only=_only_in(gpu_rows[ours], gpu_rows[plain], steps),
                plain_only=_only_in(gpu_rows[plain], gpu_rows[ours], steps),
                lm_kernel=lm_kernel["name"], lm_us=f"{1000 * lm_ms:.1f}", ours_lm_us=_us_step(mm[ours], steps),
                vocab=f"{config['vocab_size']:,}", hidden=h, lm_gb=f"{lm_bytes / 1e9:.3f}",
                lm_tb=f"{tb_s['lm']:.2f}", gemm=INT4_GEMM, gemm_calls=f"{gemm_calls:g}", per_layer=f"{gemm_calls / n:g}",
                layers=n, plain_gemm=f"{gemm_ms[plain]:.3f}", ours_gemm=f"{gemm_ms[ours]:.3f}",
                intermediate=i, heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
                head_dim=q // config["num_attention_heads"], weights=f"{weights:,}", bits=scheme.bits,
                group=scheme.group_size, bf16_bytes=BF16_BYTES, int4_gb=f"{int4_bytes / 1e9:.3f}",
                gemm_tb=f"{tb_s['gemm']:.2f}",
                datasheet=fill("profile_datasheet", gpu=gpu, bandwidth=f"{bandwidth:g}",
                               gemm_share=f"{100 * tb_s['gemm'] / bandwidth:.0f}",
                               lm_share=f"{100 * tb_s['lm'] / bandwidth:.0f}",
                               ideal=f"{int4_bytes / (bandwidth * 1e12) * 1e3:.3f}", gemm_ms=f"{gemm_ms[plain]:.3f}",
                               ours=ours) if bandwidth else "")


def tp_section(run: dict | None) -> str:
    if not run:
        return fill("tp_not_measured")
    rows = []
    for arm in run["arms"]:
        summary = ", ".join(f"{k} {v}" for k, v in arm.get("checks", {}).items() if isinstance(v, bool)) or "-"
        rows += [[arm["arm"], str(lv.get("concurrency", "-")), _ms(lv.get("tokens_per_s"), ",.0f"),
                  _ms(lv.get("ttft_p50_ms")), summary] for lv in arm.get("levels", []) or [{}]]
    return fill("tp", date=run["date"], gpus=run["gpus"], gpu=run["gpu"], failures=_unfinished(run["arms"], "arm"),
                table=table(["arm", "streams", "tok/s", "TTFT p50 ms", "checks"], rows, "lrrrl"))


if __name__ == "__main__":
    main()
