"""Several gRPC front ends on one vLLM engine core: `superweights serve --front-ends N`.

One Python process saturates first: vLLM's output processor detokenizes every token of every stream in the process
that serves them. vLLM's answer is `vllm serve --api-server-count N`, and this is the same with vLLM's own
machinery: the engine core launched once (vllm.v1.engine.utils.launch_core_engines), N front-end processes started
by vLLM's APIServerProcessManager, each an AsyncLLM client of that core with its own output processor and its own
grpc.aio server on the same port (SO_REUSEPORT: the kernel spreads new connections over them).

    this process      the model resolved once, the engine core, the front ends, one /metrics over all of them
    front end 0       the fixed adapters, the self-check, the probe, the canary; then READY (server.app)
    front ends 1..    wait for READY, then serve the same arms (LoRA ids derived from each variant)
Any process dying stops the whole server with a non-zero status, so an orchestrator restarts it: a dead engine core
is told to every front end (ENGINE_DIED: NOT_SERVING, calls in flight UNAVAILABLE), a dead front end stops the
others. SIGTERM drains every front end, then stops the engine core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing import connection
from pathlib import Path

from superweights.compression.errors import UserError

from .app import ENGINE_DIED, FrontEnd, ServeConfig, StartupError, check_free, run, start_metrics, stop_metrics
from .engine import (
    ADAPTER_DIR_PREFIX,
    FrontEndClient,
    engine_args,
    engine_start_failures,
    prepare_workers,
    vllm_usage_context,
)
from .scratch import make_scratch_dir
from .startup import ResolvedModel, resolve_model, served_engine_config

log = logging.getLogger(__name__)
RUN_DIR_PREFIX = "superweights-run-"  # a server's front ends' shared metrics files

STOP_MARGIN = 30.0  # seconds beyond the grace period before a front end that has not exited is killed


def auto_front_ends(cpu: bool) -> int:
    """--front-ends auto: 1 on a CPU engine, whose cores run the model itself; on a GPU one front end per four
    cores this process may use, at most 4 (BENCHMARKS.md, "Several front ends")."""
    if cpu:
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) // 4))


@dataclass(frozen=True)
class _Spec:
    """What every front-end process is started with (pickled by multiprocessing's spawn)."""

    config: ServeConfig
    resolved: ResolvedModel
    run_dir: Path
    adapter_root: Path | None
    log_level: int


def _front_end_main(listen_address, sock, spec: _Spec, client_config: dict) -> None:
    """One front-end process (APIServerProcessManager's target_server_fn)."""
    client_config = dict(client_config)
    count, index = client_config.pop("client_count"), client_config.pop("client_index")
    client_config.pop("api_server_loads", None)  # vLLM's HTTP servers balance on it; the kernel balances ours
    multiprocessing.current_process().name = f"FrontEnd_{index}"
    with contextlib.suppress(ImportError):
        from vllm.utils.system_utils import set_process_title

        set_process_title("FrontEnd", str(index), prefix="superweights")
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    front_end = FrontEnd(FrontEndClient(client_config, index, count), spec.resolved, spec.run_dir, spec.adapter_root)
    try:
        code = asyncio.run(run(spec.config, front_end))
    except UserError as e:
        log.error("%s", " ".join(str(e).split()))
        code = 2
    sys.exit(code)


@contextlib.contextmanager
def _launched(vllm_config, count: int, spec: _Spec):
    """The engine core and `count` front ends, as `vllm serve --api-server-count` starts them (its
    run_multi_api_server: vLLM 0.32's listeners, or 0.26's addresses that each front end reports back).
    Yields (front-end manager, engine manager); shuts down what it started."""
    from vllm.v1.engine import utils as engine_utils
    from vllm.v1.executor import Executor
    from vllm.v1.utils import APIServerProcessManager

    executor_class = Executor.get_class(vllm_config)
    stack = contextlib.ExitStack()  # whatever started is stopped, also when the engine core fails to start
    common = {"listen_address": "", "sock": None, "args": spec, "num_servers": count,
              "target_server_fn": _front_end_main}
    if hasattr(engine_utils, "bind_engine_zmq_listeners"):
        listeners = engine_utils.bind_engine_zmq_listeners(vllm_config, count)
        with stack, engine_utils.launch_core_engines(vllm_config, executor_class, True,
                                                     listeners.addresses) as launch:
            stack.callback(_shut_down, launch.engine_manager, launch.coordinator)
            front_ends = APIServerProcessManager(
                input_listeners=listeners.inputs, output_listeners=listeners.outputs, tensor_queue=launch.tensor_queue,
                stats_update_address=_stats_address(launch.coordinator), **common)
            stack.callback(front_ends.shutdown)
            launch.watched_frontend_processes = front_ends.processes
            stack = stack.pop_all()  # started: from here the block below owns them
        engine_manager = launch.engine_manager
    else:
        addresses = engine_utils.get_engine_zmq_addresses(vllm_config, count)
        with stack, engine_utils.launch_core_engines(vllm_config, executor_class, True, addresses,
                                                     count) as launched:
            engine_manager, coordinator, addresses, tensor_queue = launched
            stack.callback(_shut_down, engine_manager, coordinator)
            front_ends = APIServerProcessManager(
                input_addresses=addresses.inputs, output_addresses=addresses.outputs, tensor_queue=tensor_queue,
                stats_update_address=_stats_address(coordinator), **common)
            stack.callback(front_ends.shutdown)
            addresses.inputs, addresses.outputs = front_ends.gather_actual_addresses()
            stack = stack.pop_all()
    with stack:  # front ends first, then the engine core
        yield front_ends, engine_manager


def hold_port(host: str, port: int) -> socket.socket | None:
    """The port, bound but not listening, for as long as the server runs. SO_REUSEPORT lets this server's front
    ends listen on it beside this socket (minutes later, once the engine core is up) and brings no connection here;
    without SO_REUSEADDR, another server's check_free is refused meanwhile, so two servers started together cannot
    both come to serve one port. Port 0 becomes the one port the kernel chose, for every front end.

    None where the port cannot be held though check_free found no one listening: connections of an earlier server
    that listened without SO_REUSEPORT (a one-process server) still in TIME_WAIT there. The server then starts
    unheld, as check_free allows, and says so."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind(sockaddr)
    except OSError as e:
        held.close()
        if e.errno == errno.EADDRINUSE:
            log.warning("port %d not held while the engine starts (an earlier server's connections are still "
                        "closing there): a server started meanwhile on it would not be refused", port)
            return None
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}; choose another with --port/--host") from e
    return held


def _stats_address(coordinator) -> str | None:
    return coordinator.get_stats_publish_address() if coordinator else None


def _shut_down(engine_manager, coordinator) -> None:
    if engine_manager is not None:
        engine_manager.shutdown()
    if coordinator is not None:
        coordinator.shutdown()


class _Stop(Exception):
    """SIGTERM or SIGINT while the server starts."""


def serve(config: ServeConfig) -> int:
    """Run a server of `config.front_ends` front ends until SIGTERM or SIGINT (0), or until a process of it dies
    (the front end's status, or 1)."""
    count = config.front_ends
    check_free(config.host, config.port)  # the front ends share the port: no one else may hold it
    held = hold_port(config.host, config.port)
    if held is not None:
        config = replace(config, port=held.getsockname()[1])
    run_dir = make_scratch_dir(RUN_DIR_PREFIX)
    adapter_root: Path | None = None
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before any front end imports prometheus_client
    stopping = {"asked": False, "watching": None}

    def on_signal(signum, frame) -> None:
        stopping["asked"] = True
        if stopping["watching"] is None:
            raise _Stop
        stopping["watching"].send(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    httpd = None
    try:
        if config.metrics_port:
            from prometheus_client import CollectorRegistry, multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
            httpd = start_metrics(config.host, config.metrics_port, registry)
        resolved = resolve_model(config)
        if resolved.report.super_weights:  # no super weights, no adapters
            adapter_root = make_scratch_dir(ADAPTER_DIR_PREFIX)
        engine_config = served_engine_config(config, resolved)
        prepare_workers(engine_config)
        args = engine_args(engine_config, resolved.report)
        args._api_process_count, args._api_process_rank = count, -1
        vllm_config = args.create_engine_config(usage_context=vllm_usage_context())
        spec = _Spec(config, resolved, run_dir, adapter_root, logging.getLogger().getEffectiveLevel())
        log.info("starting the engine core and %d front ends on %s:%d", count, config.host, config.port)
        with engine_start_failures(), _launched(vllm_config, count, spec) as (front_ends, engine_manager):
            return _watch(front_ends.processes, getattr(engine_manager, "processes", []), config, stopping)
    except _Stop:
        log.info("stopped while starting")
        return 0
    finally:
        if held is not None:
            held.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if httpd is not None:
            stop_metrics(httpd)
        shutil.rmtree(run_dir, ignore_errors=True)
        if adapter_root is not None:
            shutil.rmtree(adapter_root, ignore_errors=True)


def _watch(front_ends: list, engine_cores: list, config: ServeConfig, stopping: dict) -> int:
    """Until a signal or a process's death; then bring every front end down, as the cause requires."""
    woken, wake = multiprocessing.Pipe(duplex=False)
    stopping["watching"] = wake
    if stopping["asked"]:
        wake.send(signal.SIGTERM)
    watched = {p.sentinel: p for p in [*front_ends, *engine_cores]}
    log.info("serving with %d front ends (pids %s) on one engine core", len(front_ends),
             ", ".join(str(p.pid) for p in front_ends))
    while True:
        ready = connection.wait([woken, *watched])
        if woken in ready:
            log.info("draining %d front ends (%.0f s grace), then stopping the engine core", len(front_ends),
                     config.grace_seconds)
            return _bring_down(front_ends, signal.SIGTERM, config.grace_seconds + STOP_MARGIN)
        process = watched[ready[0]]
        if process in engine_cores:
            log.error("the engine core (pid %d) has died: every front end NOT_SERVING, exit status 1", process.pid)
            _bring_down(front_ends, ENGINE_DIED, STOP_MARGIN)
            return 1
        log.error("front end %s (pid %d) exited with status %s: stopping the server", process.name, process.pid,
                  process.exitcode)
        _bring_down([p for p in front_ends if p is not process], signal.SIGTERM, config.grace_seconds + STOP_MARGIN)
        return process.exitcode if process.exitcode and process.exitcode > 0 else 1  # killed by a signal: 1


def _bring_down(front_ends: list, sig: int, timeout: float) -> int:
    """Send `sig` to every live front end and wait for them (killed after `timeout`); the worst exit status."""
    from prometheus_client import multiprocess

    for p in front_ends:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
    deadline = time.monotonic() + timeout
    for p in front_ends:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            log.error("front end %s did not exit in %.0f s: killed", p.name, timeout)
            p.kill()
            p.join()
        multiprocess.mark_process_dead(p.pid)
    return max((abs(p.exitcode or 0) for p in front_ends), default=0)
