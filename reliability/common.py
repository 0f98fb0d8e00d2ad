"""What the campaigns and the test suite share: the harness that starts a server on loopback, waits for it and stops
it (tests/conftest.py's fixtures use it too), channels and clients to it, its metrics and processes, a greedy
golden generation, and the results folder. Traffic goes to 127.0.0.1 / localhost only."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from superweights.server.harness import SUPERWEIGHTS, ServerProcess, free_port
from superweights.v1 import superweights_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path("/tmp/superweights-reliability")  # the campaigns' server logs
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["SuperWeightService"]
SERVICE = SERVICE_DESCRIPTOR.full_name
METHODS = tuple(m.name for m in SERVICE_DESCRIPTOR.methods)  # Generate, GetSuperWeights, CompareGenerations, ...
GOLDEN_PROMPT = "The capital of France is"
ADAPTER_GLOB = "superweights-adapters-*"
CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclass
class Server(ServerProcess):
    """A `superweights serve` process started by `start_server` (superweights.server.harness), on loopback."""

    port: int = 0
    metrics_port: int = 0
    token: str | None = None
    tls: dict | None = None  # reliability.certs.make_mtls paths; with client_cert: mutual TLS
    start_seconds: float | None = None  # set by `served`

    @property
    def target(self) -> str:
        return f"{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def client(self, token: str | None = "default", timeout: float = 120):
        """The project's Python client with this server's token ("default") and certificates (the right client
        certificate where the server asks for one)."""
        from superweights.server.client import SuperWeightClient

        tls = self.tls or {}
        return SuperWeightClient(self.target, token=self.token if token == "default" else token,
                                 root_cert=tls.get("ca"), client_cert=tls.get("client_cert"),
                                 client_key=tls.get("client_key"), timeout=timeout)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


def start_server(log: Path, *extra: str, token: str | None = None, tls: dict | None = None,
                 kv_cache_gib: int = 1) -> Server:
    """`superweights serve` (the default model unless `extra` names one), loopback ports, its own process group,
    output to `log`; tls with a client_cert: mutual TLS (--tls-client-ca)."""
    port, metrics_port = free_port(), free_port()
    args = [SUPERWEIGHTS, "serve", "--port", str(port), "--metrics-port", str(metrics_port), *extra]
    if token:
        args += ["--auth-token", token]
    if tls:
        args += ["--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])]
        if tls.get("client_cert"):
            args += ["--tls-client-ca", str(tls["ca"])]
    started = ServerProcess.start(args, log, env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}, cwd=REPO)
    return Server(started.process, started.log, port, metrics_port, token, tls)


def wait_serving(server: Server, timeout: float = 600) -> float:
    """Seconds until health says SERVING; RuntimeError when the process exits or the time runs out."""
    return server.wait_until(lambda: health(server) == "SERVING", timeout, what="SERVING")


@contextlib.contextmanager
def served(log: Path, *flags: str, **options) -> Iterator[Server]:
    """A server (start_server's arguments) SERVING for the block, stopped after it whatever the block does;
    `server.start_seconds` says how long it took to start."""
    server = start_server(log, *flags, **options)
    try:
        server.start_seconds = wait_serving(server)
        yield server
    finally:
        server.stop()


# -- talking to any server -------------------------------------------------------------------------------------
def credentials(server, client: str | None = "client") -> grpc.ChannelCredentials | None:
    """TLS credentials for this server: client None (no client certificate), "client" (the right one, when the
    server's tls has one) or "rogue" (signed by another CA)."""
    tls = server.tls
    if not tls:
        return None
    cert, key = (tls.get(f"{client}_cert"), tls.get(f"{client}_key")) if client else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=Path(tls["ca"]).read_bytes(),
                                        private_key=Path(key).read_bytes() if key else None,
                                        certificate_chain=Path(cert).read_bytes() if cert else None)


def channel(server, client: str | None = "client", asynchronous: bool = False):
    """A channel to the server (TLS when it has TLS); the caller closes it."""
    module = grpc.aio if asynchronous else grpc
    creds = credentials(server, client)
    if creds is None:
        return module.insecure_channel(server.target, options=CLIENT_OPTIONS)
    return module.secure_channel(server.target, creds, options=CLIENT_OPTIONS)


def request_class(method: str):
    """The request message class of an RPC, from the service descriptor (message names may change)."""
    return message_factory.GetMessageClass(SERVICE_DESCRIPTOR.methods_by_name[method].input_type)


def rpc(ch, method: str, raw: bool = False):
    """A callable for one RPC on a channel (sync or aio); raw: bytes in, bytes out (no (de)serialization)."""
    descriptor = SERVICE_DESCRIPTOR.methods_by_name[method]
    path = f"/{SERVICE}/{method}"
    if raw:
        kwargs = {}
    else:
        kwargs = {"request_serializer": lambda m: m.SerializeToString(),
                  "response_deserializer": message_factory.GetMessageClass(descriptor.output_type).FromString}
    return (ch.unary_stream if descriptor.server_streaming else ch.unary_unary)(path, **kwargs)


def metadata(server, token: str | None = "default") -> tuple[tuple[str, str], ...]:
    token = server.token if token == "default" else token
    return (("authorization", f"Bearer {token}"),) if token else ()


def health(server, service: str = "", timeout: float = 5) -> str:
    with channel(server) as ch:
        response = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def scrape(server) -> dict[str, dict[tuple, float]]:
    """Every metric family of one /metrics scrape: {name: {sorted label items: value}} (counters by their
    `_total` sample)."""
    families: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        values = families.setdefault(family.name, {})
        for s in family.samples:
            if s.name in (family.name, f"{family.name}_total"):
                values[tuple(sorted(s.labels.items()))] = s.value
    return families


def metric_values(server, name: str) -> dict[tuple, float]:
    """Samples of one metric family: {sorted label items: value}."""
    return scrape(server).get(name, {})


def unfinished(server) -> float:
    return sum(metric_values(server, "superweights_engine_unfinished_requests").values())


def asyncio_tasks(server) -> float | None:
    """The front end's asyncio task count, where the server exposes it (superweights_asyncio_tasks)."""
    values = metric_values(server, "superweights_asyncio_tasks")
    return sum(values.values()) if values else None


def idle_asyncio_tasks(server, readings: int = 5, timeout: float = 30) -> float | None:
    """The front end's asyncio tasks while it is idle: the least of `readings` scrapes (0.2 s apart) that show no
    RPC in flight and no engine request. Work in progress (a canary run, a call finishing) only adds tasks; a
    leaked one is in every reading. None if the server does not expose the gauge or is never idle in `timeout`."""
    idle: list[float] = []
    deadline = time.monotonic() + timeout
    while len(idle) < readings and time.monotonic() < deadline:
        families = scrape(server)
        if "superweights_asyncio_tasks" not in families:
            return None
        busy = sum(families.get("superweights_requests_in_flight", {}).values()) + \
            sum(families.get("superweights_engine_unfinished_requests", {}).values())
        if not busy:
            idle.append(sum(families["superweights_asyncio_tasks"].values()))
        time.sleep(0.2)
    return min(idle) if idle else None


def greedy_request(max_tokens: int = 24) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=GOLDEN_PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                             ignore_eos=True))


def golden(server, max_tokens: int = 24) -> list[int]:
    """Greedy token ids of GOLDEN_PROMPT: identical before and after a campaign when nothing leaked into the
    engine's state (a stuck adapter slot, a half-aborted request)."""
    with channel(server) as ch:
        stream = rpc(ch, "Generate")(greedy_request(max_tokens), metadata=metadata(server), timeout=120)
        return [i for message in stream for i in message.token_ids]


def code_name(error: grpc.RpcError) -> str:
    code = error.code()
    return code.name if code is not None else "NONE"


# -- the processes behind a server -----------------------------------------------------------------------------
def engine_processes(server) -> list[psutil.Process]:
    """The engine core and its workers: every descendant of the front end."""
    try:
        return psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def front_end_processes(server) -> list[psutil.Process]:
    """The front ends of a server of several (superweights::FrontEnd_<i>), by index; [] for a one-process server."""
    found = []
    for p in engine_processes(server):
        try:
            title = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "FrontEnd_" in title:
            found.append((int(title.rsplit("FrontEnd_", 1)[1].split()[0]), p))
    return [p for _, p in sorted(found, key=lambda item: item[0])]


def engine_core(server) -> psutil.Process:
    """vLLM's engine core process (titled VLLM::EngineCore), a child of the front end."""
    for p in engine_processes(server):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError("no engine core process under the server")


def process_stats(server) -> dict[str, float]:
    """RSS (MiB) of the front end and of the engine processes together; the front end's open fds and threads."""
    front = psutil.Process(server.process.pid)
    engine_rss = 0
    for p in engine_processes(server):
        try:
            engine_rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"frontend_rss_mib": front.memory_info().rss / 2**20, "engine_rss_mib": engine_rss / 2**20,
            "fds": front.num_fds(), "threads": front.num_threads()}


def adapter_count(directory: Path) -> int:
    """The adapters in a server's adapter directory: its subdirectories (beside them is the file that names the
    directory's owner)."""
    return sum(p.is_dir() for p in directory.iterdir())


def adapter_files() -> dict[str, int]:
    """Every server's temporary adapter directory (/tmp/superweights-adapters-*) with its number of adapters."""
    import tempfile

    return {str(d): adapter_count(d) for d in Path(tempfile.gettempdir()).glob(ADAPTER_GLOB) if d.is_dir()}


def adapter_dir_of(server, before: dict[str, int]) -> Path | None:
    """The adapter directory that appeared since `before` (taken just before the server started)."""
    new = sorted(set(adapter_files()) - set(before))
    return Path(new[0]) if len(new) == 1 else None


def adapter_dir_holding(variant: str) -> Path | None:
    """The one adapter directory that holds an adapter named `variant` (a scaled_<alpha> that only one of the
    running servers has made); None if none or several do."""
    found = [Path(d) for d in adapter_files() if (Path(d) / variant).is_dir()]
    return found[0] if len(found) == 1 else None


# -- results ---------------------------------------------------------------------------------------------------
def campaign_parser(doc: str):
    """The command line every campaign shares (--seed, --front-ends); each adds its own options."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--front-ends", type=int, default=1, help="the server's front-end processes on its one "
                        "engine core; results go to results/<campaign>-<N>fe.json (%(default)s)")
    return parser


def write_result(name: str, data: dict) -> Path:
    """reliability/results/<name>.json with the date, the command and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # "-dirty": the campaign ran on uncommitted changes on top of that commit
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                            cwd=REPO, check=False)
    record = {"campaign": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m " + " ".join([f"reliability.{name.split('-')[0]}", *sys.argv[1:]]),
              "commit": commit.stdout.strip(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB", **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def campaign(name: str, flags: Sequence[str], measure: Callable[[Server], dict],
             finish: Callable[[dict], None] | None = None, front_ends: int = 1, **server_options) -> dict:
    """Start a server with `flags`, measure it, stop it, `finish` the result, write results/<name>.json; with
    several front ends (--front-ends) results/<name>-<N>fe.json."""
    if front_ends > 1:
        flags, name = [*flags, "--front-ends", str(front_ends)], f"{name}-{front_ends}fe"
    result: dict = {"server_flags": list(flags)}
    with served(LOGS / f"{name}-server.log", *flags, **server_options) as server:
        result["server_start_seconds"] = round(server.start_seconds, 1)
        result.update(measure(server))
    result["exit_code"] = server.process.returncode
    if finish is not None:
        finish(result)
    print(write_result(name, result))
    return result


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
