"""What a device benchmark serves, and with which engine options: a model directory (the 8B-shaped one of
benchmarks.model_8b, or the default model), its declared super weights, dtype and load format; the AsyncEngineArgs
fields our server hands vLLM for it, taken from the server's own `engine_args`, so that every vLLM arm runs with
exactly ours; and the command-line options that name a model."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

# vLLM's own servers' scheduler on an H100/H200 (UsageContext.OPENAI_API_SERVER), written out for every arm
SCHEDULER = {"max_num_seqs": 1024, "max_num_batched_tokens": 8192}
# vLLM's engine-only fallbacks (SchedulerConfig), for the arm that shows what they cost
ENGINE_CONTEXT_SCHEDULER = {"max_num_seqs": 128, "max_num_batched_tokens": 2048}
# the AsyncEngineArgs fields every arm shares
SHARED = ("dtype", "max_model_len", "seed", "load_format", "enable_lora", "max_loras", "max_cpu_loras",
          "max_lora_rank", "lora_target_modules", "max_num_seqs", "max_num_batched_tokens")
LORA_KEYS = ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules")
MODEL_8B_DIR = Path(".models/llama3-8b-shape")


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


def shared_options(config, report, lora: bool = True) -> dict:
    """The AsyncEngineArgs fields our server sets for `report` on `config` (an EngineConfig), as keywords for any
    vLLM arm; lora False drops LoRA."""
    from superweights.server.engine import engine_args

    args = engine_args(config, report)
    # the given options as given (vLLM turns a dict such as compilation_config into its config object)
    options = {**{k: getattr(args, k) for k in SHARED if getattr(args, k) is not None}, **config.engine_options}
    return options if lora else {k: v for k, v in options.items() if k not in LORA_KEYS}


def engine_options(model: Model, lora: bool = True, scheduler: dict | None = None) -> dict:
    """What our server asks of vLLM for `model` with the declared super weights; `scheduler` overrides SCHEDULER."""
    from superweights.server.engine import EngineConfig

    scheduler = SCHEDULER if scheduler is None else scheduler
    config = EngineConfig(checkpoint=model.path, dtype=model.dtype,
                          engine_options={"load_format": model.load_format, **scheduler, **model.extra})
    return shared_options(config, model.report(), lora)


def add_model_options(p: argparse.ArgumentParser) -> None:
    m = Model(MODEL_8B_DIR)
    p.add_argument("--model", type=Path, default=m.path,
                   help="model directory (benchmarks.model_8b), or 'default' for the default model")
    p.add_argument("--super-weights", default=m.super_weights, metavar="L:ROW:COL,...",
                   help="declared super weights (default: Meta-Llama-3-8B's published ones)")
    p.add_argument("--dtype", default=m.dtype)
    p.add_argument("--load-format", default=m.load_format)
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="one more engine option for every arm, e.g. enforce_eager=true (repeat)")


def model_from(args: argparse.Namespace) -> Model:
    """The Model the options name; --model default: the default model's checkpoint (SmolLM2-135M, from the pack's
    GGUF payload on the device)."""
    from superweights.server.options import engine_options as parse_engine_options

    path = args.model
    if str(path) == "default":
        from benchmarks.gpu_env import place_default_model
        from superweights.compression.models import resolve_checkpoint

        place_default_model()
        path = Path(resolve_checkpoint(None).path)
    return Model(path, args.super_weights, args.dtype, args.load_format, parse_engine_options(args.engine_option))


def model_args(model: Model) -> list[str]:
    """The command-line options that rebuild `model` in a child process."""
    return ["--model", str(model.path), "--super-weights", model.super_weights, "--dtype", model.dtype,
            "--load-format", model.load_format,
            *[x for k, v in model.extra.items() for x in ("--engine-option", f"{k}={json.dumps(v)}")]]


def model_prompts(model: Model) -> list[list[int]]:
    """The fixed prompts (benchmarks.load.prompts) in the model's tokenizer."""
    from transformers import AutoTokenizer

    from benchmarks.load import prompts

    return prompts(AutoTokenizer.from_pretrained(model.path))
