"""Quantized serving at 8B (issue 13, item 4): w8a8, fp8-dynamic and w4a16 artifacts of the 8B-shaped model with
the declared super weights protected, decode tok/s at 1 and 32 streams against bf16.

    python -m benchmarks.gpu_8b_quant run --art ~/art8b --out $OUT                # device: make, then measure
    python -m benchmarks.gpu_8b_quant run --art ~/art8b --out $OUT --config-only  # no weights written

Make (a child process, so its GPU memory is gone before an engine starts): the model is random-initialized in
bf16 on the GPU (normal, std 0.02; norms 1), the declared super weights planted at PLANTED (a 50-sigma outlier),
and every Linear but the LM head quantized there by compression.artifact.compress_linear, the code `superweights
compress` writes with: the protected columns zeroed, held out of every scale and stored dense. DIR/<scheme>/ gets
config.json (quantization_config from compression.artifact.quantization_config), safetensors shards and the
tokenizer; no evaluation.json or manifest (perplexity of random weights means nothing), so vLLM serves it through
the superweights plugin but our server does not take it as an artifact. --config-only writes config.json and the
tokenizer only, served with load_format=dummy: the same kernels and the same protected-column correction on random
values, in seconds instead of minutes of writing ~25 GB.

Measure (a child per model, LoRA on down_proj as our server serves): decode tok/s at 1 and 32 streams (128
greedy tokens), and the super weights as the engine computes with them (SuperWeightProbe): with weights written,
the planted value comes back through the int4/int8/fp8 kernel plus the plugin's float32 correction, rounded to bf16.
Writes $OUT/gpu8b_quant_<models>.json after each model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.gpu_8b import (
    Budget,
    Model,
    add_model_options,
    add_run_options,
    arm_env,
    device_facts,
    engine_options,
    model_args,
    model_from,
    model_prompts,
    offline_level,
    run_child,
    run_in_turn,
    write_child_result,
)

SCHEMES = ("w4a16", "fp8-dynamic", "w8a8")
MODELS = ("bf16", *SCHEMES)
STREAMS, ROUNDS, TOKENS = (1, 32), {1: 3, 32: 2}, 128
PLANTED, INIT_STD = 1.0, 0.02
SHARD_BYTES = 4 * 2**30


def artifact_config(model: Model, scheme_name: str) -> tuple[dict, object, dict[str, list[int]]]:
    """(config.json with its quantization_config, the scheme fitted to the model, protected columns by module)."""
    from superweights.compression.artifact import quantization_config
    from superweights.compression.quantize import held_out_channels
    from superweights.compression.schemes import fit_to_model, get_scheme

    config = json.loads((model.path / "config.json").read_text())
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    scheme = fit_to_model(get_scheme(scheme_name), [hidden, intermediate])
    protected = held_out_channels(model.report())
    return {**config, "quantization_config": quantization_config(scheme, protected)}, scheme, protected


def write_config_dir(model: Model, scheme_name: str, out: Path) -> dict:
    """OUT/config.json and the tokenizer files; returns the config."""
    config, _, _ = artifact_config(model, scheme_name)
    out.mkdir(parents=True, exist_ok=True)
    for path in model.path.iterdir():
        if path.is_file() and path.name != "config.json":
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def random_model(model: Model, device: str):
    """The model in bf16 on `device`, random-initialized, the declared super weights planted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model.path)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net = net.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 1:  # norms
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=g)
        modules = dict(net.named_modules())
        for w in model.report().super_weights:
            modules[w.module].weight[w.row, w.col] = PLANTED  # [out, in]: row = hidden channel, col = input
    return net.eval()


def compress_on(weight, scheme, cols: list[int]) -> dict:
    """compress_linear where the weight lives (GPU), on CPU where compressed-tensors cannot run there."""
    from superweights.compression.artifact import compress_linear

    try:
        tensors = compress_linear(weight, scheme, cols)
    except (RuntimeError, TypeError, NotImplementedError):
        tensors = compress_linear(weight.cpu(), scheme, cols)
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


class ShardWriter:
    """safetensors shards of at most SHARD_BYTES each, written as they fill (model-00001.safetensors, ...)."""

    def __init__(self, out: Path, limit: int = SHARD_BYTES):
        self.out, self.limit, self.pending, self.size, self.count = out, limit, {}, 0, 0

    def add(self, key: str, tensor) -> None:
        self.pending[key] = tensor
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            self.count += 1
            save_file(self.pending, self.out / f"model-{self.count:05d}.safetensors", metadata={"format": "pt"})
            self.pending, self.size = {}, 0


def make_artifacts(model: Model, schemes: list[str], art: Path, device: str = "cuda") -> list[dict]:
    """Every scheme's artifact of one random-initialized model (see the module docstring)."""
    from superweights.compression.quantize import quantized_linears

    t0 = time.perf_counter()
    net = random_model(model, device)
    made = [{"init_seconds": time.perf_counter() - t0}]
    linears = quantized_linears(net)
    for name in schemes:
        t0, out = time.perf_counter(), art / name
        shutil.rmtree(out, ignore_errors=True)
        write_config_dir(model, name, out)
        _, scheme, protected = artifact_config(model, name)
        writer = ShardWriter(out)
        for module_name, module in linears.items():
            for key, value in compress_on(module.weight, scheme, protected.get(module_name, [])).items():
                writer.add(f"{module_name}.{key}", value)
        quantized = {f"{n}.weight" for n in linears}
        for key, value in net.state_dict().items():
            if key not in quantized:
                writer.add(key, value.cpu().contiguous())
        writer.flush()
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        made.append({"scheme": name, "seconds": time.perf_counter() - t0, "bytes": size, "shards": writer.count})
        print(json.dumps(made[-1]), flush=True)
    return made


def served_model(model: Model, name: str, art: Path, config_only: bool) -> Model:
    if name == "bf16":
        return model
    return Model(art / name, model.declared, model.dtype, "dummy" if config_only else "auto", model.extra)


def measure_model(model: Model, tokens: int = TOKENS, streams: tuple[int, ...] = STREAMS) -> dict:
    """Decode tok/s at each stream count and the probed super weights, one offline engine."""
    from vllm import LLM, SamplingParams

    from superweights.compression.vllm_plugin import combine_probe_values
    from superweights.server.engine import PROBE_EXTENSION

    options = {**engine_options(model), "worker_extension_cls": PROBE_EXTENSION}
    t0 = time.perf_counter()
    llm = LLM(model=str(model.path), disable_log_stats=False, **options)
    result = {"engine_options": options, "startup_seconds": time.perf_counter() - t0, "decode": []}
    report = model.report()
    entries = [(w.module, w.row, w.col) for w in report.super_weights]
    result["engine_values"] = combine_probe_values(llm.collective_rpc("probe_super_weights", args=(entries,)))
    prompt_set = model_prompts(model)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt_set[0]}], params, use_tqdm=False)  # warm-up
    for n in streams:
        result["decode"].append(offline_level(llm, params, prompt_set, n, ROUNDS.get(n, 2)))
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    from benchmarks.gpu_env import register_plugin

    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    path = args.out / f"gpu8b_quant_{'_'.join(args.models)}.json"
    results = {**device_facts(), "plugin": register_plugin(), "env": arm_env(), "super_weights": model.declared,
               "config": json.loads((model.path / "config.json").read_text()),
               "weights": "dummy (config only)" if args.config_only else "random-initialized, written",
               "planted": None if args.config_only else PLANTED, "tokens": args.tokens, "rounds": ROUNDS,
               "models": []}
    missing = [s for s in args.models if s != "bf16" and not (args.art / s / "config.json").is_file()]
    results["make"] = {}
    if missing and args.config_only:
        for name in missing:
            write_config_dir(model, name, args.art / name)
    elif missing:
        results["make"] = run_child(["make", *missing, "--art", str(args.art), "--device", args.device,
                                     *model_args(model)],
                                    timeout=max(budget.left() - 120, 1), module="benchmarks.gpu_8b_quant",
                                    log=log_dir / "quant-make.log")

    def measure(name: str, entry: dict, saved) -> None:
        served = served_model(model, name, args.art, args.config_only)
        if not (served.path / "config.json").is_file():
            entry["error"] = f"no artifact at {served.path}: making it failed ({results['make'].get('error')})"
            return
        entry.update(run_child(["measure", *model_args(served), "--tokens", str(args.tokens)],
                               timeout=max(budget.left(), 1), module="benchmarks.gpu_8b_quant",
                               log=log_dir / f"quant-{name}.log"))

    run_in_turn(args.models, "model", results, results["models"], path, budget, measure)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("run", help="make what is missing, then measure each model (the device call)")
    add_run_options(p)
    # no choices=: argparse checks an empty or default list of nargs="*" against them as one value
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"of {', '.join(MODELS)} (default: all)")
    p.add_argument("--art", type=Path, default=Path.home() / "art8b")
    p.add_argument("--config-only", action="store_true", help="no weights: config.json + dummy load")
    p.add_argument("--device", default="cuda", help="where the artifacts are made (cpu to try it here)")
    m = sub.add_parser("make", help="(child) write the artifacts of a random-initialized model")
    m.add_argument("schemes", nargs="+", choices=SCHEMES)
    m.add_argument("--art", type=Path, required=True)
    m.add_argument("--device", default="cuda")
    add_model_options(m)
    m.add_argument("--result", type=Path, required=True)
    e = sub.add_parser("measure", help="(child) one model's decode speed and probed super weights")
    add_model_options(e)
    e.add_argument("--tokens", type=int, default=TOKENS)
    e.add_argument("--streams", nargs="+", type=int, default=list(STREAMS))
    e.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.what == "run":
        args.models = args.models or list(MODELS)
        if unknown := sorted(set(args.models) - set(MODELS)):
            parser.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    return args


def main() -> None:
    args = parse_args()
    model = model_from(args)
    if args.what == "run":
        run(model, args)
        return
    if args.what == "make":
        write_child_result(args.result, lambda: {"made": make_artifacts(model, args.schemes, args.art, args.device)})
    else:
        write_child_result(args.result, lambda: measure_model(model, args.tokens, tuple(args.streams)))


if __name__ == "__main__":
    main()
