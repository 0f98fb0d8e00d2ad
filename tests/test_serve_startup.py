"""`superweights serve` refuses a configuration it cannot run within seconds: one line, exit 2, nothing left
running (ports are bound before the engine starts, so a taken port costs no engine start)."""

import re
import socket
import time

import pytest

from tests.conftest import run_cli
from tests.test_cli_errors import assert_one_line_error

FAST = 90  # seconds: importing vLLM, never starting it (an engine start alone takes longer on this machine)


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_grpc_port_taken(taken_port):
    start = time.monotonic()
    done = run_cli("-q", "serve", "--port", str(taken_port), "--metrics-port", "0", timeout=FAST)
    assert_one_line_error(done, f"cannot listen on 127.0.0.1:{taken_port}", "--port")
    assert time.monotonic() - start < FAST


def test_metrics_port_taken(taken_port):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        grpc_port = free.getsockname()[1]
    done = run_cli("-q", "serve", "--port", str(grpc_port), "--metrics-port", str(taken_port), timeout=FAST)
    assert_one_line_error(done, f"cannot serve metrics on 127.0.0.1:{taken_port}", "--metrics-port")


def test_bad_engine_arg_on_the_command_line():
    """Checking a name needs vLLM imported, which logs about Triton first; the error is still one line, last."""
    fragment = "did you mean tensor_parallel_size"
    done = run_cli("-q", "serve", "--engine-arg", "tensor_paralel_size=2", timeout=FAST)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("superweights: error: ")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1] and fragment in errors[0]


def test_engine_args_pass_through_typed():
    from superweights.server.options import engine_options

    options = engine_options(["tensor-parallel-size=2", "enforce_eager=true", "gpu_memory_utilization=0.85",
                              "distributed_executor_backend=ray", "--max-num-seqs=64"])
    assert options == {"tensor_parallel_size": 2, "enforce_eager": True, "gpu_memory_utilization": 0.85,
                       "distributed_executor_backend": "ray", "max_num_seqs": 64}


def test_ray_executor_where_vllm_platform_has_no_ray_is_refused():
    """vLLM's CPU platform names no Ray device (its engine would die starting: "current platform cpu does not support
    ray"): refused before anything starts, naming the platform. A platform with Ray (CUDA) passes."""
    from vllm.platforms import current_platform

    from superweights.server.engine import EngineConfig, EngineOptionError, check_executor

    config = EngineConfig(engine_options={"distributed_executor_backend": "ray", "tensor_parallel_size": 2})
    if current_platform.ray_device_key:
        check_executor(config)
    else:
        with pytest.raises(EngineOptionError, match=f"{current_platform.device_name} platform has no Ray support"):
            check_executor(config)
    check_executor(EngineConfig(engine_options={"distributed_executor_backend": "mp", "tensor_parallel_size": 2}))


@pytest.mark.parametrize("arg, fragment", [
    ("no-such-option=1", "not an engine argument"),
    ("dtype=float16", "use its own option (--dtype"),
    ("tensor_parallel_size", "expected KEY=VALUE"),
])
def test_bad_engine_args_are_user_errors(arg, fragment):
    from superweights.server.engine import EngineOptionError
    from superweights.server.options import engine_options

    with pytest.raises(EngineOptionError, match=re.escape(fragment)):
        engine_options([arg])


def test_the_engine_gets_the_api_servers_scheduler_defaults(monkeypatch):
    """Our engine is started as vLLM's OpenAI server starts its own (UsageContext.OPENAI_API_SERVER), not with the
    engine-only defaults (128 running sequences, 2,048 batched tokens, whatever the GPU): on an H200 the API server
    runs 1,024 sequences at once, and with 128 half of 256 streams waited a whole generation for their first
    token. The engine start is stopped right there (vLLM is the edge)."""
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from superweights.compression.declared import config_only_checkpoint
    from superweights.compression.models import resolve_checkpoint
    from superweights.server.engine import EngineConfig, SuperWeightEngine
    from tests.test_format import _report

    seen = {}

    def from_engine_args(args, usage_context=UsageContext.ENGINE_CONTEXT, **kwargs):
        seen.update(args=args, usage_context=usage_context)
        raise RuntimeError("stopped before the engine starts")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(from_engine_args))
    checkpoint = config_only_checkpoint(resolve_checkpoint(None).path)
    engine = SuperWeightEngine(EngineConfig(checkpoint=checkpoint.path), _report())
    with pytest.raises(RuntimeError, match="stopped before"):
        asyncio.run(engine.start())
    assert seen["usage_context"] == UsageContext.OPENAI_API_SERVER
    assert isinstance(seen["args"], AsyncEngineArgs) and seen["args"].max_num_seqs is None  # vLLM's default applies


def _last_line_error(done, fragment: str) -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("superweights: error: ")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1] and fragment in errors[0]


def test_more_front_ends_than_concurrent_calls_is_refused():
    """Each front end admits its share of --max-concurrent, at least one call: 4 front ends cannot share 2."""
    done = run_cli("-q", "serve", "--front-ends", "4", "--max-concurrent", "2", timeout=FAST)
    _last_line_error(done, "--front-ends 4 is more than --max-concurrent 2")


def test_an_empty_auth_token_is_refused():
    """`--auth-token "$TOKEN"` with TOKEN unset would turn auth on with a token any blank header matches."""
    assert_one_line_error(run_cli("-q", "serve", "--auth-token", " ", timeout=FAST), "--auth-token is empty")


def test_auth_tokens_are_read_as_the_header_is():
    from superweights.server.cli import _auth_tokens

    assert _auth_tokens(["a "], " b , ,c") == ("a", "b", "c")


def test_a_front_end_waiting_for_ready_stops_when_told(tmp_path):
    """A front end that waits for the first one to be ready (which may be failing its self-check) ends its wait on
    SIGTERM instead of being killed after grace + margin."""
    import asyncio

    from superweights.server.app import wait_ready

    async def scenario():
        stop = asyncio.Event()
        stop.set()
        return await asyncio.wait_for(wait_ready(tmp_path, stop, poll=0.01), 5)

    assert asyncio.run(scenario()) is None


def test_a_held_port_is_refused_to_another_server_and_open_to_the_front_ends():
    """While a server of several front ends starts (minutes), its port is held: another server's check refuses
    it, and the front ends' gRPC servers still listen on it and are reached there."""
    import asyncio

    import grpc

    from superweights.server.app import StartupError, check_free
    from superweights.server.frontends import hold_port

    held = hold_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        assert port != 0
        with pytest.raises(StartupError, match="Address already in use"):
            check_free("127.0.0.1", port)

        async def front_ends():
            servers = [grpc.aio.server() for _ in range(2)]
            try:
                assert [s.add_insecure_port(f"127.0.0.1:{port}") for s in servers] == [port, port]
                for s in servers:
                    await s.start()
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
            finally:
                for s in servers:
                    await s.stop(0)

        asyncio.run(front_ends())
    finally:
        held.close()


def test_a_port_an_earlier_server_left_in_time_wait_starts_unheld():
    """Connections a one-process server (no SO_REUSEPORT) closed stay in TIME_WAIT on its port for a minute: no
    one listens, so check_free lets a server of several front ends start there; the port is then not held (None),
    rather than the start refused."""
    import socket

    from superweights.server.app import check_free
    from superweights.server.frontends import hold_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
    listener.close()
    client.close()
    check_free("127.0.0.1", port)
    assert hold_port("127.0.0.1", port) is None
