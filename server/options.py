"""`--engine-arg KEY=VALUE`: vLLM engine arguments passed through the command line, checked against the installed vLLM."""

from __future__ import annotations

from .engine import EngineOptionError

# Set by the server from its own options (--dtype, --max-model-len, --seed, the report's variants): not passable.
OWN_ENGINE_ARGS = ("model", "dtype", "max_model_len", "seed", "enable_lora", "max_loras", "max_cpu_loras",
                   "max_lora_rank", "disable_log_stats")


def engine_options(pairs: list[str] | tuple[str, ...]) -> dict:
    """`KEY=VALUE` strings (vLLM engine argument names, dashes or underscores) -> AsyncEngineArgs keywords.
    VALUE is read as JSON (numbers, true/false, null, lists, objects), else kept as a string."""
    if not pairs:
        return {}
    import difflib
    import json

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = set(AsyncEngineArgs.__dataclass_fields__)
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise EngineOptionError(f"--engine-arg {pair!r}: expected KEY=VALUE, e.g. tensor_parallel_size=2")
        if key in OWN_ENGINE_ARGS:
            raise EngineOptionError(f"--engine-arg {key}: the server sets it itself; use its own option "
                                    f"(--{key.replace('_', '-')} where there is one)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise EngineOptionError(f"--engine-arg {key}: not an engine argument of the installed vLLM"
                                    + (f"; did you mean {', '.join(close)}?" if close else ""))
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options
