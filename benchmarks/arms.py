"""The arms of a side-by-side serving run on one model: which server each arm starts, with which engine options,
and one server arm measured with the server's own metrics per level and the engine's scheduler read from its log.

Arms: `offline` (vLLM's LLM, benchmarks.offline_engine), `ours`, `ours-ids` (ours streaming token ids only, as
vLLM's gRPC server does), `vllm-grpc`, `vllm-openai`; and `ours-engine-context` (ours with vLLM's engine-only
scheduler fallbacks), `vllm-openai-nolora` (vLLM's OpenAI server without LoRA). A server arm named `NAME@N` runs N
front-end processes on its one engine core: ours with `--front-ends N`, vLLM's OpenAI server with
`--api-server-count N` (`ours@4`, `ours-ids@4`, `vllm-openai@4`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.checks import served_checks
from benchmarks.load import measure_server
from benchmarks.served_model import ENGINE_CONTEXT_SCHEDULER, Model, engine_options
from benchmarks.servers import ServerSpec, ours_spec, vllm_spec

ARMS = ("offline", "ours", "ours-ids", "vllm-grpc", "vllm-openai")
EXTRA_ARMS = ("ours-engine-context", "vllm-openai-nolora")
PER_CLIENT = {1: 8, 32: 4, 256: 3}  # requests each client sends at a level (2 at any other)


def front_ends_of(arm: str) -> tuple[str, int]:
    """(the arm's server, its front-end processes): "ours@4" -> ("ours", 4); "ours" -> ("ours", 1)."""
    name, _, count = arm.partition("@")
    if name not in ARMS + EXTRA_ARMS or (count and not (count.isdigit() and int(count) >= 1)):
        raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS + EXTRA_ARMS)}, optionally @N front ends")
    return name, int(count or 1)


def arm_options(arm: str, model: Model) -> dict:
    """The engine options of `arm`: our server's for `model`, less LoRA or with the old scheduler where the arm
    says so."""
    name, _ = front_ends_of(arm)
    if name == "vllm-openai-nolora":
        return engine_options(model, lora=False)
    if name == "ours-engine-context":
        return engine_options(model, scheduler=ENGINE_CONTEXT_SCHEDULER)
    return engine_options(model)


def server_spec(arm: str, model: Model, options: dict) -> tuple[ServerSpec, int | None]:
    """(how to start `arm` on free loopback ports, its metrics port or None)."""
    name, count = front_ends_of(arm)
    if name in ("ours", "ours-ids", "ours-engine-context"):
        spec = ours_spec(arm, [str(model.path), "--super-weights", model.declared], options, front_ends=count)
    elif name in ("vllm-openai", "vllm-openai-nolora", "vllm-grpc"):
        spec = vllm_spec(arm, model.path, options, api_servers=count)
    else:
        raise ValueError(f"unknown server arm {name!r}: {', '.join(ARMS[1:] + EXTRA_ARMS)}")
    return spec, spec.metrics_port


async def measure_arm(name: str, model: Model, prompt_set: list[list[int]], levels: tuple[int, ...], tokens: int,
                      log_dir: Path, ready_timeout: float, on_level: Callable[[dict], None], label: str = "",
                      repeat: int = 1, client_processes: int = 1) -> dict:
    """Start the server of arm `name` on `model`, check it (ours), run the levels (each `repeat` times, the clients
    in `client_processes` processes) with the server's own metrics, stop it; on_level(result so far) after each
    level. A failure is recorded in the result, not raised."""
    options = arm_options(name, model)
    spec, _ = server_spec(name, model, options)
    checks = partial(served_checks, prompt_ids=prompt_set[0]) if spec.client in ("ours", "ours-ids") else None
    result = {"arm": label or name, "front_ends": front_ends_of(name)[1], "engine_options": options}
    result.update(await measure_server(spec, prompt_set, levels, tokens, log_dir, per_client=PER_CLIENT,
                                       ready_timeout=ready_timeout, checks=checks, metrics=True,
                                       on_level=lambda partial_result: on_level({**result, **partial_result}),
                                       repeat=repeat, client_processes=client_processes))
    return result
