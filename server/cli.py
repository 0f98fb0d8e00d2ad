"""`superweights` command line: detect, serve, and client commands for a running server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from superweights.compression.detect import DEFAULT_PROMPT, DetectionSettings
from superweights.compression.errors import UserError
from superweights.compression.report import SuperWeightReport


def _detection_settings(args: argparse.Namespace) -> DetectionSettings:
    return DetectionSettings(spike_ratio=args.spike_ratio, min_effect=args.min_effect,
                             eval_tokens=args.eval_tokens, max_candidates=args.max_candidates,
                             min_spike_fraction=args.min_spike_fraction, screen_tokens=args.screen_tokens,
                             control_weights=args.control_weights)


def add_detection_options(p: argparse.ArgumentParser) -> None:
    d = DetectionSettings()
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="detection prompt (default: %(default)r)")
    p.add_argument("--eval-text", type=Path, help="evaluation text file (default: bundled Moby-Dick ch. 1-3)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="tokens of the baseline and of verdicts the screen cannot settle (%(default)s)")
    p.add_argument("--screen-tokens", type=int, default=d.screen_tokens,
                   help="every removal is measured first on this many tokens (%(default)s)")
    p.add_argument("--control-weights", type=int, default=d.control_weights, metavar="N",
                   help="the paper's control: the N largest other down-projection weights removed together "
                   "(%(default)s)")
    p.add_argument("--spike-ratio", type=float, default=d.spike_ratio,
                   help="a layer spikes when max |output| is this multiple of its median |output| (%(default)s)")
    p.add_argument("--min-effect", type=float, default=d.min_effect,
                   help="confirm when removal multiplies perplexity by this much (%(default)s)")
    p.add_argument("--max-candidates", type=int, default=d.max_candidates, help="(%(default)s)")
    p.add_argument("--min-spike-fraction", type=float, default=d.min_spike_fraction,
                   help="stop when the largest spike left is below this fraction of the first (%(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached report matches")


def add_offline_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Where transformers runs the offline work (detection, evaluation, quantization)."""
    from superweights.compression.models import OFFLINE_DEVICES, OFFLINE_DTYPES

    what = "the offline (transformers) work runs: detection" if prefix else "the model runs"
    p.add_argument(f"--{prefix}device", choices=OFFLINE_DEVICES, default="auto",
                   help=f"where {what}; auto: the GPU when torch sees one (%(default)s)")
    p.add_argument(f"--{prefix}dtype", choices=OFFLINE_DTYPES, default="auto",
                   help="auto: bfloat16 on a GPU, float32 on the CPU (%(default)s)")


def _times(ratio: float | None) -> str:
    """A perplexity ratio as printed: x1.06, x21,433.6, x1.5e+09 (a broken model); "-" where none was measured."""
    if ratio is None:
        return "-"
    return f"x{ratio:.2f}" if ratio < 10 else f"x{ratio:,.1f}" if ratio < 1e6 else f"x{ratio:.1e}"


def _table(*columns: str, left: tuple[str, ...] = ()):
    """A table that fits 80 columns as it can: no outer edge, one space between columns, numbers right-aligned;
    a cell that does not fit folds onto a second line instead of losing its end to an ellipsis."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", overflow="fold")
    return table


def _module_template(weights) -> str | None:
    """The one module name every row has, its layer number written as L ("model.layers.L.mlp.down_proj"); None
    when the rows' modules differ in more than the layer."""
    import re

    names = {re.sub(rf"(?<=\.){w.layer}(?=\.)", "L", w.module, count=1) for w in weights}
    return names.pop() if len(names) == 1 else None


def _print_weights(console, title: str, weights: list) -> None:
    """A table of super weights or candidates: the module said once above it, where every row shares one."""
    template = _module_template(weights)
    tokens = {w.tokens for w in weights}
    per_row = len(tokens) > 1  # some verdicts remeasured on all tokens: a column; else said once
    scored = "" if per_row or None in tokens else f", on {tokens.pop()} tokens"
    where = f" in {template} (L: the layer)" if template else ""
    console.print(f"\n[bold]{title}[/bold]{where}; perplexity x when removed, alone and on top of the super "
                  f"weights confirmed before it (conditional){scored}", highlight=False)
    table = _table("layer", *(() if template else ("module",)), "row", "col", "value", "|in|", "|out|", "alone",
                   "conditional", *(("tokens",) if per_row else ()), left=("module",))
    for w in weights:
        table.add_row(str(w.layer), *(() if template else (w.module,)), str(w.row), str(w.col), f"{w.value:+.6f}",
                      f"{w.input_magnitude:.1f}", f"{w.output_magnitude:.1f}", _times(w.perplexity_ratio),
                      _times(w.conditional_ratio), *(("-" if w.tokens is None else str(w.tokens),) if per_row else ()))
    console.print(table)


def _print_activations(console, activations: list) -> None:
    """The super activations, one row each; each one's feeders listed below the table."""
    from rich.markup import escape

    console.print("\n[bold]super activations[/bold] in the residual stream on the prompt; all of an activation's "
                  "feeders zeroed: what is left of it and perplexity x", highlight=False)
    table = _table("channel", "layers", "value", "token", "zeroed", "perplexity", left=("token",))
    for a in activations:
        table.add_row(str(a.channel), f"{a.layer}-{a.last_layer}", f"{a.value:+.1f}",
                      escape(f"{a.token_position} {a.token!r}"),
                      "-" if a.value_removed is None else f"{a.value_removed:+.1f}", _times(a.perplexity_ratio_removed))
    console.print(table)
    for a in activations:
        finding = "carried by super weights" if a.carried_by_super_weight else "no single weight carries it"
        if not a.feeders:
            console.print(f"\nchannel {a.channel}: {finding}; no candidate feeds it", highlight=False)
            continue
        console.print(f"\nchannel {a.channel}: {finding}; the candidates in its row that feed it, each zeroed "
                      f"alone: the activation and perplexity x", highlight=False)
        table = _table("layer", "row", "col", "value", "super weight", "activation", "perplexity")
        for f in a.feeders:
            table.add_row(str(f.layer), str(f.row), str(f.col), f"{f.value:+.6f}", "yes" if f.confirmed else "no",
                          f"{f.value_removed:+.1f}", _times(f.perplexity_ratio))
        console.print(table)


def print_report(report: SuperWeightReport, console=None) -> None:
    """The report as a person reads it, in tables that fit 80 columns (console: a rich Console; default: stdout at
    the terminal's width, or $COLUMNS)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    m, e = report.model, report.evaluation
    about = f"{m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}"
    console.print(f"[bold]{escape(m.name)}[/bold] ({about})" if m.name else f"[bold]{about}[/bold]", highlight=False)
    if report.prompt:
        console.print(f"prompt: {report.prompt!r}", markup=False, highlight=False)
    if m.declared:
        console.print("super weights declared (--super-weights), not detected: nothing was measured", highlight=False)
    if e.baseline_perplexity is not None:
        bos = "each window starts with BOS" if e.bos else "no BOS"
        console.print(f"eval: {e.text}, {e.tokens} tokens in windows of {e.window} ({bos}), baseline perplexity "
                      f"{e.baseline_perplexity:.2f}; removals measured on the first {e.screen_tokens} tokens "
                      f"(baseline {e.screen_baseline_perplexity:.2f}), near calls on all", markup=False,
                      highlight=False)
    if report.super_weights:
        _print_weights(console, "super weights", report.super_weights)
    else:
        console.print(f"[yellow]no super weights found[/yellow]: no candidate's removal changed perplexity by "
                      f"{report.min_effect}x or more", highlight=False)
    if report.rejected_candidates:
        _print_weights(console, "rejected candidates", report.rejected_candidates)
    if report.super_weights and e.baseline_perplexity is not None:
        console.print(f"all super weights removed: perplexity {_times(e.removed_ratio)}; size-matched control, the "
                      f"{e.control_weights} largest other down-projection weights removed: "
                      f"{_times(e.control_ratio)}", highlight=False)
    if e.largest_control_weights:
        console.print(f"paper's control, the {e.largest_control_weights} largest other down-projection weights "
                      f"removed together: perplexity {_times(e.largest_control_ratio)}", highlight=False)
    if report.super_activations:
        _print_activations(console, report.super_activations)
    if report.published:
        p = report.published
        console.print(f"\npublished ({p.source}, entry {p.entry}): detection "
                      f"{'agrees exactly' if p.exact else 'disagrees'}", markup=False, highlight=False)
        for c in p.coordinates:
            status = ("published, detected" if c.published and c.detected else
                      "published, not detected" if c.published else "detected, not published")
            note = f" ({c.note})" if c.note else ""
            console.print(f"  layer {c.layer} [{c.row}, {c.col}]: {status}{note}", markup=False, highlight=False)


def cmd_detect(args: argparse.Namespace) -> int:
    from superweights.compression.pipeline import detect

    _, report = detect(args.model, prompt=args.prompt, settings=_detection_settings(args), eval_path=args.eval_text,
                       use_cache=not args.no_cache, progress=not args.quiet, device=args.device, dtype=args.dtype)
    if args.plot:
        from superweights.compression.plots import plot_layer_extremes

        plot_layer_extremes(report, args.plot)
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _coordinates(value: str):
    from superweights.compression.published import CoordinateSpecError, parse_coordinates

    try:
        return parse_coordinates(value)
    except CoordinateSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _clip(value: str) -> tuple[str, float]:
    """"none", "search", "zscore:3", "percentile:99.9" -> (rule, value)."""
    rule, _, number = value.partition(":")
    try:
        return rule, float(number) if number else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad clip {value!r}: use none, search, zscore:Z or percentile:P") from None


def cmd_compress(args: argparse.Namespace) -> int:
    from superweights.compression.artifact import ARTIFACT_EVAL_TOKENS, compress
    from superweights.compression.pipeline import detect
    from superweights.compression.schemes import get_scheme

    scheme = get_scheme(args.scheme)
    clip, clip_value = args.clip if args.clip else (scheme.weights.clip, scheme.weights.clip_value)
    scheme = scheme.variant(protect=not args.no_protect, clip=clip, clip_value=clip_value)
    checkpoint, report = detect(args.model, progress=not args.quiet, device=args.device, dtype=args.dtype)
    artifact = compress(checkpoint, report, scheme, args.output, progress=not args.quiet,
                        eval_tokens=args.tokens or ARTIFACT_EVAL_TOKENS, device=args.device, dtype=args.dtype)
    e = artifact.evaluation
    size = sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())
    print(f"{artifact.path}: {scheme.label}, {size / 2**20:.1f} MiB, {len(artifact.manifest['files'])} files in "
          f"the manifest")
    print(f"offline: perplexity {e['perplexity']:.3f} on {e['tokens']} tokens (super weights removed: "
          f"{e['removed_perplexity']:,.1f}); serve it with `superweights serve {artifact.path}`")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from superweights.compression.artifact import is_artifact

    if is_artifact(args.model):
        return _eval_artifact(args)
    from superweights.compression.pipeline import detect
    from superweights.compression.scheme_eval import evaluate_schemes, markdown_table, write_results
    from superweights.compression.schemes import SCHEMES, get_scheme

    schemes = [get_scheme(n) for n in (args.scheme or list(SCHEMES))]
    checkpoint, report = detect(args.model, progress=not args.quiet, device=args.device, dtype=args.dtype)
    clips = (("none", 0.0), args.clip) if args.clip and args.clip[0] != "none" else (("none", 0.0),)
    rows = evaluate_schemes(checkpoint, report, schemes, clips=clips, tokens=args.tokens, progress=not args.quiet,
                            device=args.device, dtype=args.dtype)
    print(markdown_table(rows, SCHEMES))
    if args.output:
        meta = {"model": checkpoint.name, "model_sha256": checkpoint.sha256, "tokens": args.tokens,
                "super_weights": [f"{w.module}[{w.row},{w.col}]" for w in report.super_weights]}
        paths = write_results(rows, SCHEMES, args.output, meta)
        print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _eval_artifact(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from superweights.compression.artifact import evaluate_artifact_dir, open_artifact

    artifact = open_artifact(args.model)
    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    e = evaluate_artifact_dir(artifact.path, artifact.scheme, artifact.report, tokenizer, eval_tokens=args.tokens,
                              window=artifact.evaluation["window"], device=args.device, dtype=args.dtype)
    print(json.dumps(e, indent=2))
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from superweights.compression.models import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    print(f"{checkpoint.name}: {checkpoint.path} (sha256 {checkpoint.sha256[:16]})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .app import ServeConfig, run
    from .engine import EngineConfig, check_executor, is_cpu_engine
    from .options import engine_options
    from .service import Limits

    tokens = _auth_tokens(args.auth_token or (), os.environ.get("SUPERWEIGHTS_AUTH_TOKENS", ""))
    engine = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                          max_scaled_variants=args.max_scaled_variants, seed=args.seed,
                          engine_options=engine_options(args.engine_arg or ()))
    check_executor(engine)  # before the model is resolved: minutes sooner
    config = ServeConfig(
        model=args.model, engine=engine, host=args.host, port=args.port, metrics_port=args.metrics_port,
        limits=Limits(max_tokens=args.max_tokens_limit, max_concurrent=args.max_concurrent, max_queue=args.max_queue),
        max_message_bytes=args.max_message_bytes, auth_tokens=tokens, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, reflection=not args.no_reflection, grace_seconds=args.grace,
        canary_interval=args.canary_interval, prompt=args.prompt, self_check_tolerance=args.self_check_tolerance,
        detection=_detection_settings(args), eval_text=args.eval_text, super_weights=tuple(args.super_weights or ()),
        offline_device=args.offline_device, offline_dtype=args.offline_dtype, use_cache=not args.no_cache)
    front_ends = args.front_ends
    if front_ends == "auto":
        from .frontends import auto_front_ends

        front_ends = min(auto_front_ends(is_cpu_engine(args.device)), args.max_concurrent)
    elif front_ends > args.max_concurrent:  # each front end admits its share of the calls, at least one
        raise UserError(f"--front-ends {front_ends} is more than --max-concurrent {args.max_concurrent}: each front "
                        f"end admits its share of the server's concurrent calls, at least one; raise --max-concurrent "
                        f"or lower --front-ends")
    if front_ends == 1:
        return asyncio.run(run(config))
    from .frontends import serve

    return serve(replace(config, front_ends=front_ends))


def _auth_tokens(flags, environment: str) -> tuple[str, ...]:
    """The accepted bearer tokens: each --auth-token, then $SUPERWEIGHTS_AUTH_TOKENS's comma-separated ones, with
    the spaces around each dropped (a client's header is read so too). An empty --auth-token (an unset variable,
    say) is refused: it would turn auth on with no token to send."""
    tokens = [t.strip() for t in flags]
    if not all(tokens):
        raise UserError("--auth-token is empty (an unset shell variable?): give the token, or leave the flag out "
                        "to serve without auth")
    return tuple(tokens + [t.strip() for t in environment.split(",") if t.strip()])


def _front_ends(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"--front-ends takes a count of at least 1, or auto; got {value!r}")
    return count


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """Defaults come from the config dataclasses: one place says what a default is."""
    from .app import ServeConfig
    from .engine import EngineConfig
    from .service import Limits

    s, e, lim = ServeConfig(), EngineConfig(), Limits()
    p.add_argument("--host", default=s.host, help="listen address (%(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=s.port, help="gRPC port (%(default)s)")
    p.add_argument("--metrics-port", type=int, default=s.metrics_port, help="Prometheus port, 0 for none "
                   "(%(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=lim.max_tokens, help="largest max_tokens a request may "
                   "ask (%(default)s)")
    p.add_argument("--max-concurrent", type=int, default=lim.max_concurrent, help="engine-bound requests running "
                   "at once (%(default)s)")
    p.add_argument("--max-queue", type=int, default=lim.max_queue, help="requests waiting beyond that; more are "
                   "refused with RESOURCE_EXHAUSTED (%(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=s.max_message_bytes, help="largest request message "
                   "(%(default)s)")
    p.add_argument("--auth-token", action="append", help="accepted bearer token (repeat; or "
                   "$SUPERWEIGHTS_AUTH_TOKENS, comma-separated); none: no auth")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA for client certificates: turns on mutual TLS")
    p.add_argument("--no-reflection", action="store_true", help="switch gRPC server reflection off (production)")
    p.add_argument("--front-ends", type=_front_ends, default="auto", metavar="N|auto", help="gRPC front-end "
                   "processes on one engine core, all on --port; each detokenizes and streams its own calls. auto: 1 "
                   "on a CPU engine, on a GPU one per 4 cores up to 4 (%(default)s)")
    p.add_argument("--grace", type=float, default=s.grace_seconds, help="seconds in-flight calls get at shutdown "
                   "(%(default)s)")
    p.add_argument("--canary-interval", type=float, default=s.canary_interval, help="seconds between canary runs; "
                   "0: off (%(default)s)")
    p.add_argument("--self-check-tolerance", type=float, help="allowed relative gap between the engine's and the "
                   "offline perplexity at start-up (default: 0.02 in float32, 0.10 in 16-bit)")
    p.add_argument("--super-weights", type=_coordinates, metavar="L:ROW:COL,...", help="declare the super weights "
                   "instead of detecting them (e.g. Meta-Llama-3-8B's published 1:788:2427,1:1384:2427,1:4062:2427): "
                   "unverified; with --engine-arg load_format=dummy their values are read from the engine")
    g = p.add_argument_group("engine", "the vLLM engine; any other vLLM engine argument passes through --engine-arg")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=e.device)
    g.add_argument("--dtype", default=e.dtype, help="auto: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--max-model-len", type=int, default=e.max_model_len, help="(%(default)s)")
    g.add_argument("--max-scaled-variants", type=int, default=e.max_scaled_variants, help="scaled_<alpha> "
                   "variants kept loaded; the least recently used makes room (%(default)s)")
    g.add_argument("--seed", type=int, default=e.seed, help="(%(default)s)")
    g.add_argument("--engine-arg", action="append", metavar="KEY=VALUE", help="any vLLM AsyncEngineArgs field, "
                   "repeatable, e.g. tensor_parallel_size=2, gpu_memory_utilization=0.85, enforce_eager=true, "
                   "distributed_executor_backend=ray; VALUE is read as JSON, else as a string")


def _client(args: argparse.Namespace):
    from .client import SuperWeightClient

    return SuperWeightClient(args.target, token=args.token or os.environ.get("SUPERWEIGHTS_TOKEN"),
                             root_cert=args.tls_ca, client_cert=args.tls_client_cert,
                             client_key=args.tls_client_key, timeout=args.timeout)


def _sampling_args(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "logprobs": args.logprobs}


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        last = None
        for message in client.generate_stream(args.prompt, variant=args.variant, chat=args.chat,
                                              **_sampling_args(args)):
            print(message.text, end="", flush=True)
            last = message
        print()
        print(f"[{last.finish_reason}: {last.prompt_tokens} prompt + {last.completion_tokens} generated tokens]",
              file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = SuperWeightReport.from_dict(json.loads(client.super_weights().report_json))
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
    return 0


def print_compare(response, prompt: str, console=None) -> None:
    """A CompareGenerationsResponse as a person reads it: a table of the arms' numbers that fits 80 columns, then
    each arm's text below it (console: a rich Console; default: stdout)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    console = console or Console()
    console.print(f"prompt: {prompt!r}", markup=False, highlight=False)
    table = _table("variant", "finish", "stop-word mass", "first diff", "top-1 agree", "KL top-k",
                   left=("variant", "finish"))
    divergence = {d.variant: d for d in response.divergence}
    for arm in response.arms:
        d = divergence.get(arm.variant)
        first = "-" if d is None else "none" if d.first_differing_token < 0 else str(d.first_differing_token)
        table.add_row(escape(arm.variant), escape(arm.finish_reason), f"{arm.stop_word_mass:.3f}", first,
                      "-" if d is None else f"{d.top1_agreement:.2f}", "-" if d is None else f"{d.mean_kl_topk:.3f}")
    console.print(table)
    console.print(Text("\ntext of each arm", style="bold"))
    for arm in response.arms:
        console.print(Text(f"{arm.variant}:", style="bold"))
        console.print(Padding(Text(arm.text), (0, 0, 0, 2), expand=False))


def cmd_compare(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.compare(args.prompt, variants=args.variant, alphas=args.alpha, chat=args.chat,
                                  **_sampling_args(args))
    print_compare(response, args.prompt)
    if args.plot:
        import math

        from superweights.compression.plots import ArmTrace, plot_compare

        first = {d.variant: d.first_differing_token for d in response.divergence if d.first_differing_token >= 0}
        traces = [ArmTrace(arm.variant, tuple(t.token for t in arm.tokens),
                           tuple(math.exp(t.logprob) for t in arm.tokens), first.get(arm.variant))
                  for arm in response.arms]
        plot_compare(traces, args.plot, title=f"prompt: {args.prompt!r}")
        print(f"plot written to {args.plot}")
    return 0


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server host:port (%(default)s)")
    p.add_argument("--token", help="bearer token (or $SUPERWEIGHTS_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--tls-client-cert", type=Path, help="client certificate for mutual TLS")
    p.add_argument("--tls-client-key", type=Path, help="client key for mutual TLS")
    p.add_argument("--timeout", type=float, default=300, help="deadline in seconds (%(default)s)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (%(default)s)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--logprobs", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from superweights import __version__

    parser = argparse.ArgumentParser(prog="superweights", description=__doc__)
    parser.add_argument("--version", action="version", version=f"superweights {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="find and verify a model's super weights")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema superweights.report/v1)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="per-layer down_proj max |input| / |output| plot")
    add_detection_options(p)
    add_offline_options(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("compress", help="write a compressed-tensors artifact that keeps the super weights")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or .gguf (default: embedded)")
    p.add_argument("--scheme", required=True, choices=("w8a8", "fp8-dynamic", "w4a16"),
                   help="w8a8: CPU and GPU; fp8-dynamic and w4a16: GPU")
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact directory (replaced)")
    p.add_argument("--no-protect", action="store_true", help="quantize the super weights like any other weight")
    p.add_argument("--clip", type=_clip, help="weight clipping: none, search, zscore:Z, percentile:P "
                   "(default: the scheme's, none)")
    p.add_argument("--tokens", type=int, help="evaluation tokens measured into the artifact (default 4096)")
    add_offline_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="quality of every scheme, with and without protection and clipping; or of "
                       "one artifact")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, .gguf, or an artifact directory (default: embedded)")
    p.add_argument("--scheme", action="append", help="schemes to compare (repeat; default: all)")
    p.add_argument("--clip", type=_clip, default=("search", 0.0),
                   help="the clipping compared against none (default: search; none: skip)")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (%(default)s)")
    p.add_argument("-o", "--output", type=Path, help="directory for eval.json, eval.md and eval.png")
    add_offline_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a model over gRPC (default: the embedded model on this machine)")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, .gguf, or a `superweights compress` artifact (default: embedded)")
    add_serve_options(p)
    add_detection_options(p)
    add_offline_options(p, prefix="offline-")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream a generation from a running server")
    add_sampling_options(p)
    p.add_argument("--variant", default="", help="base (default), no_super_weights, ...")
    add_client_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="the super weights a running server found")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="A/B: one prompt through the base model and without super weights")
    add_sampling_options(p)
    p.add_argument("--variant", action="append", help="arms (default: base, no_super_weights)")
    p.add_argument("--alpha", type=float, action="append", help="also run super weights scaled by ALPHA")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw each arm's per-token probability of "
                   "its chosen tokens, the first divergence marked")
    add_client_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("model", help="model cache commands")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    q = model_sub.add_parser("prepare", help="fetch and convert a model to a safetensors checkpoint (cached)")
    q.add_argument("model", nargs="?", default=None, help="checkpoint directory or .gguf (default: embedded)")
    q.set_defaults(func=cmd_model_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by transformers' and huggingface_hub's bars
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except UserError as e:  # the caller's mistake: one line, exit 2, no traceback
        if args.verbose:
            raise
        print(f"superweights: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a gRPC error from a client command: one line with its status
        import grpc

        if not isinstance(e, grpc.RpcError) or args.verbose:
            raise
        print(f"superweights: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
