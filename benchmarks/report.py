"""BENCHMARKS.md and its plots from every saved result, their one writer. This module computes figures and tables;
the prose is benchmarks/BENCHMARKS.template.md, whose slots benchmarks.markdown fills; benchmarks.plots draws.

    .venv/bin/python -m benchmarks.report

Reads, under benchmarks/: results.json (serving_default_model cpu), detection.json (detection_cost), limits.json
(machine_limits), zero_adapter.json (zero_adapter_cost), profile.json (profile_frontend). Under benchmarks/gpu/:
gpu_*.json (serving_default_model gpu), lora_scope_*.json (lora_scope), first_session_lora.json (an earlier
measurement, noted by hand), artifacts_*.json (artifacts_through_engine), gpu8b_serving.json and
gpu8b_serving_first.json (serving_side_by_side), ttft_135m.json (serving_side_by_side on the default model's
architecture), gpu8b_lora.json and gpu8b_lora_first.json (lora_cost), gpu8b_quant_*.json (quantized_decode),
gpu8b_tp.json (tensor_parallel).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import plots
from benchmarks.engine_metrics import POLL_INTERVAL_S
from benchmarks.load import PROMPT_TOKENS
from benchmarks.markdown import document, fill, paragraphs, table
from benchmarks.model_8b import LLAMA3_8B
from benchmarks.served_model import ENGINE_CONTEXT_SCHEDULER, SCHEDULER

ROOT = Path(__file__).resolve().parent.parent
GPU_PLOTS = "benchmarks/gpu"  # where BENCHMARKS.md finds the GPU plots
OFFLINE_SHARE_GOAL, OFFLINE_GOAL_STREAMS = 0.95, 256  # ours: at least this share of the offline engine's tok/s
W4A16_SPEEDUP_GOAL = 1.5  # w4a16 decode at batch 1, against bf16
READ_BANDWIDTH_TB_S = {"H200": 4.8}  # HBM read bandwidth, for the quantized-decode arithmetic
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
            limits_section(limits, by_server, dtype) if limits else "", gap_section(by_server, out_dir)]


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
    serving, lora, tp = (_json(gpu / f"gpu8b_{name}.json") for name in ("serving", "lora", "tp"))
    quant = [json.loads(p.read_text()) for p in sorted(gpu.glob("gpu8b_quant_*.json"))]
    if not (serving or lora or quant or tp):
        return []
    first = next(r for r in (serving, lora, *quant, tp) if r)
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
        lora_8b_section(lora, gpu) if lora else fill("lora_8b_not_measured"),
        fill("lora_8b_earlier", date=first_lora["date"], table=lora_8b_table(first_lora),
             failures=_unfinished(first_lora["configs"], "config")) if first_lora else "",
        quant_8b_section(quant, gpu, config) if quant else fill("quant_8b_not_measured"),
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


def ttft_breakdown(by_arm: dict[str, dict[int, dict]], run: dict) -> str:
    """Client TTFT against where the servers say the time went (vLLM's histograms, our servicer's)."""
    rows = [(arm, c, lv) for arm, levels in by_arm.items() for c, lv in sorted(levels.items())
            if lv.get("server_side")]
    if not rows:
        return ""
    empty = "ours" in by_arm and not any(lv.get("server_side", {}).get("peak", {}).get("running")
                                         for lv in by_arm["ours"].values())
    cells = []
    for arm, c, lv in rows:
        s, peak = lv["server_side"], lv["server_side"].get("peak", {})
        mean = {k: s[k]["mean_ms"] if k in s else None for k in
                ("servicer_ttft", "engine_ttft", "engine_queue", "engine_prefill")}
        cells.append([arm, str(c), _ms(lv.get("ttft_p50_ms")), *(_ms(v) for v in mean.values()),
                      *(f"{peak.get(k, 0):.0f}" for k in ("running", "waiting", "admission_queued"))])
    return fill("ttft_breakdown", poll=f"{POLL_INTERVAL_S:g}",
                note=fill("ttft_columns_empty", vllm=run["vllm"]) if empty else "",
                table=table(["arm", "streams", "client TTFT p50 ms", "servicer TTFT ms", "engine TTFT ms",
                             "engine queue ms", "engine prefill ms", "running peak", "waiting peak", "our queue peak"],
                            cells, "lrrrrrrrrr"))


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


def _lora_configs(run: dict) -> tuple[dict[str, dict], dict[int, float]]:
    """The configurations that measured base traffic, and LoRA off's tok/s by batch."""
    configs = {c["config"]: c for c in run["configs"] if c.get("base")}
    return configs, {lv["concurrency"]: lv["tokens_per_s"] for lv in configs.get("off", {}).get("base", [])}


def lora_8b_table(run: dict) -> str:
    configs, off = _lora_configs(run)
    batches = sorted({lv["concurrency"] for c in configs.values() for lv in c["base"]})
    rows = []
    for name, label in LORA_LABELS.items():
        for kind in ("base", "mixed") if name in configs else ():
            tok = {lv["concurrency"]: lv["tokens_per_s"] for lv in configs[name].get(kind, [])}
            if tok:
                vs = " / ".join(f"{tok[b] / off[b]:.2f}" for b in batches if b in tok and b in off) or "-"
                rows.append([label, kind, *(f"{tok[b]:,.0f}" if b in tok else "-" for b in batches), vs])
    return table(["LoRA", "requests", *(f"tok/s at {b}" for b in batches), "vs off"], rows, "ll" + "r" * len(batches))


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
