"""Decode speed of quantized artifacts with the super weights protected, side by side with plain vLLM: w4a16,
fp8-dynamic and w8a8 checkpoints of the 8B-shaped model, decode tok/s at 1 and 32 streams against bf16, the super
weights as the engine computes with them, and a torch-profiler table of decode steps.

    bash benchmarks/on_gpu.sh quantized_decode bf16 w4a16 fp8-dynamic w8a8 --art ~/art8b   # device: make, measure
    bash benchmarks/on_gpu.sh quantized_decode --config-only --repeat 2 --profile plain-w4a16 w4a16 \
        bf16-nolora bf16 plain-w4a16 w4a16 w4a16-nolora                                   # side by side, no weights

Models: `bf16` and `bf16-nolora`; per scheme S, `S` (ours: the superweights plugin, protected columns, LoRA on
down_proj as our server serves), `S-nolora` (ours, LoRA off) and `plain-S` (vLLM's compressed-tensors alone: no
plugin, no protection, no LoRA: what a user would run instead).

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

from benchmarks.device_call import DeviceCall, child_parser, device_parser, dispatch
from benchmarks.offline_engine import OfflineEngine
from benchmarks.served_model import Model, engine_options, model_args

SCHEMES = ("w4a16", "fp8-dynamic", "w8a8")
MODELS = ("bf16", "bf16-nolora", *SCHEMES, *(f"{s}-nolora" for s in SCHEMES), *(f"plain-{s}" for s in SCHEMES))
STREAMS, ROUNDS = (1, 32), {1: 3, 32: 2}
PROFILE_STEPS = 8  # decode steps at batch 1 under the torch profiler
PLANTED, INIT_STD = 1.0, 0.02
SHARD_BYTES = 4 * 2**30
MAKE_RESERVE_S = 120  # of the budget, kept for measuring when the artifacts must be made first


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


def variant(name: str) -> tuple[str | None, bool, bool]:
    """(scheme or None for bf16, ours: through the plugin, LoRA on) of a model name."""
    plain = name.startswith("plain-")
    base = name.removeprefix("plain-").removesuffix("-nolora")
    return (None if base == "bf16" else base), not plain, not plain and not name.endswith("-nolora")


def plain_config(config: dict) -> dict:
    """The same checkpoint for vLLM alone: quantization_config as compressed-tensors' own (quant_method
    "compressed-tensors", our entry dropped), so no plugin takes part."""
    from superweights.compression.format import EXTRA_KEY

    quant = {k: v for k, v in config["quantization_config"].items() if k != EXTRA_KEY}
    return {**config, "quantization_config": {**quant, "quant_method": "compressed-tensors"}}


def write_config_dir(model: Model, scheme_name: str, out: Path, plain: bool = False) -> dict:
    """OUT/config.json and the tokenizer files (plain: vLLM's compressed-tensors alone); returns the config."""
    config, _, _ = artifact_config(model, scheme_name)
    config = plain_config(config) if plain else config
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


def artifact_model(model: Model, name: str, art: Path, config_only: bool) -> Model:
    """What `name` serves: the model itself (bf16), or a checkpoint of its scheme under ART (plain-S: ART/plain-S,
    ours with or without LoRA: ART/S)."""
    scheme, ours, _ = variant(name)
    if scheme is None:
        return model
    directory = art / (scheme if ours else f"plain-{scheme}")
    return Model(directory, model.declared, model.dtype, "dummy" if config_only else "auto", model.extra)


def measure_model(model: Model, tokens: int, streams: tuple[int, ...] = STREAMS, lora: bool = True,
                  repeat: int = 1, profile: Path | None = None) -> dict:
    """Decode tok/s at each stream count (each `repeat` times) and the probed super weights, one offline engine;
    profile: also a torch-profiler table of PROFILE_STEPS decode steps at batch 1, written there."""
    from superweights.server.engine import PROBE_EXTENSION

    options = {**engine_options(model, lora=lora), "worker_extension_cls": PROBE_EXTENSION}
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        options["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(profile.resolve()),
                                      "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
    engine = OfflineEngine.start(model, options, tokens, warm_up=1)
    result = {"engine_options": options, "startup_seconds": engine.startup_seconds,
              "engine_values": engine.probe(model.report()),
              "decode": [{**engine.level(n, ROUNDS.get(n, 2)), "run": run} for n in streams
                         for run in range(1, repeat + 1)]}
    if profile is not None:
        result["profile"] = engine.profile(PROFILE_STEPS)
    return result


def run(model: Model, args: argparse.Namespace) -> dict:
    """Make the artifacts that are missing, then measure each model that fits the budget (the device call)."""
    call = DeviceCall(args.out, f"gpu8b_quant_{'_'.join(args.models)}.json", args.budget_s)
    results = {**call.facts(model), "config": json.loads((model.path / "config.json").read_text()),
               "weights": "dummy (config only)" if args.config_only else "random-initialized, written",
               "planted": None if args.config_only else PLANTED, "tokens": args.tokens, "rounds": ROUNDS,
               "models": [], "make": {}}
    served = {name: artifact_model(model, name, args.art, args.config_only) for name in args.models}
    missing = sorted({variant(name)[0] for name, m in served.items()
                      if variant(name)[0] and not (m.path / "config.json").is_file()})
    if missing and args.config_only:
        for name, m in served.items():
            if variant(name)[0] and not (m.path / "config.json").is_file():
                write_config_dir(model, variant(name)[0], m.path, plain=not variant(name)[1])
    elif missing:
        results["make"] = call.child("benchmarks.quantized_decode", ["make", *missing, "--art", str(args.art),
                                                                      "--device", args.device, *model_args(model)],
                                     "quant-make.log", reserve_s=MAKE_RESERVE_S)

    def measure(name: str, entry: dict, saved) -> None:
        if not (served[name].path / "config.json").is_file():
            entry["error"] = f"no artifact at {served[name].path}: making it failed ({results['make'].get('error')})"
            return
        _, _, lora = variant(name)
        profile = ["--profile", str(call.logs / f"profile-{name}")] if name in args.profile else []
        entry.update(call.child("benchmarks.quantized_decode", [
            "measure", *model_args(served[name]), "--tokens", str(args.tokens), "--repeat", str(args.repeat),
            *(() if lora else ("--no-lora",)), *profile], f"quant-{name}.log"))
        if "profile" in entry:
            entry["profile"]["model"] = name

    call.in_turn(args.models, "model", results, results["models"], measure)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, sub, p = device_parser(__doc__, "make what is missing, then measure each model (the device call)")
    # no choices=: argparse checks an empty or default list of nargs="*" against them as one value
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"of {', '.join(MODELS)} (default: all)")
    p.add_argument("--art", type=Path, default=Path.home() / "art8b")
    p.add_argument("--config-only", action="store_true", help="no weights: config.json + dummy load")
    p.add_argument("--device", default="cuda", help="where the artifacts are made (cpu to try it here)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every stream count, each shown (%(default)s)")
    p.add_argument("--profile", nargs="*", default=[], metavar="MODEL", help="models whose decode steps are "
                   "profiled too (torch profiler; the table under OUT/logs/profile-MODEL)")
    m = child_parser(sub, "make", "write the artifacts of a random-initialized model")
    m.add_argument("schemes", nargs="+", choices=SCHEMES)
    m.add_argument("--art", type=Path, required=True)
    m.add_argument("--device", default="cuda")
    e = child_parser(sub, "measure", "one model's decode speed and probed super weights")
    e.add_argument("--tokens", type=int, required=True)
    e.add_argument("--streams", nargs="+", type=int, default=list(STREAMS))
    e.add_argument("--repeat", type=int, default=1)
    e.add_argument("--no-lora", dest="lora", action="store_false")
    e.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    if args.what == "run":
        args.models = args.models or ["bf16", *SCHEMES]
        if unknown := sorted(set(args.models + args.profile) - set(MODELS)):
            parser.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(['bf16', *SCHEMES])}, each also "
                         f"as NAME-nolora (ours, LoRA off), a scheme as plain-NAME (vLLM alone)")
    return args


def main() -> None:
    dispatch(parse_args(), run, {
        "make": lambda model, args: {"made": make_artifacts(model, args.schemes, args.art, args.device)},
        "measure": lambda model, args: measure_model(model, args.tokens, tuple(args.streams), args.lora, args.repeat,
                                                     args.profile)})


if __name__ == "__main__":
    main()
