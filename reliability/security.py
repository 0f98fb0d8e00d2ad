"""R5: security. Mutual TLS end to end (no client certificate, one from another CA, the right one), auth on every
RPC (streaming and compare included), tokens and prompts never in the log or /metrics, reflection off with
--no-reflection, and the scaled variants a client can create through `alphas` bounded (1,000 distinct alphas:
adapters loaded, adapter directories on disk, process memory).

    flock /tmp/engine.lock python -m reliability.security --alphas 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from .certs import make_mtls
from .common import (
    METHODS,
    adapter_count,
    adapter_dir_holding,
    adapter_files,
    campaign,
    channel,
    code_name,
    health,
    metadata,
    process_stats,
    request_class,
    rpc,
)

TOKEN = "reliability-token-5c0f1e"


def small_request(method: str, prompt: str = "hi"):
    """The cheapest valid request of each RPC."""
    cls = request_class(method)
    if method == "Generate":
        return cls(text=prompt, sampling={"max_tokens": 2, "temperature": 0.0})
    if method == "CompareGenerations":
        return cls(text=prompt, variants=["base"], sampling={"max_tokens": 1, "temperature": 0.0})
    return cls()


def call_code(server, method: str, token: str | None = "default", client: str | None = "client",
              prompt: str = "hi", chat: bool = False) -> str:
    """The status code of one small call (a stream is read to its end)."""
    request = small_request(method, prompt)
    if chat:
        request.chat = True
    try:
        with channel(server, client) as ch:
            result = rpc(ch, method)(request, metadata=metadata(server, token), timeout=60)
            if method == "Generate":
                list(result)
        return "OK"
    except grpc.RpcError as e:
        return code_name(e)


def mtls(server) -> dict:
    """Calls with no client certificate, one signed by another CA, the right one, and in plaintext."""
    plaintext = type("Plain", (), {"target": f"127.0.0.1:{server.port}", "tls": None, "token": server.token})()
    return {"no_client_certificate": call_code(server, "GetModelInfo", client=None),
            "other_ca_certificate": call_code(server, "GetModelInfo", client="rogue"),
            "right_certificate": call_code(server, "GetModelInfo"),
            "right_certificate_generate": call_code(server, "Generate"),
            "plaintext": call_code(plaintext, "GetModelInfo"),
            "health_without_certificate": _health_code(server, None)}


def _health_code(server, client: str | None) -> str:
    try:
        with channel(server, client) as ch:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return code_name(e)


def auth_every_rpc(server) -> dict:
    """Every RPC with no token, a wrong one, an empty one, the right one; health open without one."""
    tokens = {"none": None, "wrong": "wrong-token", "empty_bearer": " ", "right": "default"}
    out = {f"{method} {name}": call_code(server, method, token)
           for method in METHODS for name, token in tokens.items()}
    out["health without token"] = health(server)
    return out


def secrets_not_logged(server) -> dict:
    """The right and a wrong token, and a marked prompt (plain, chat, compare): none may appear in the server's
    log or /metrics."""
    wrong = f"wrong-{uuid.uuid4().hex}"
    marker = f"zebra-{uuid.uuid4().hex[:12]}"
    codes = [call_code(server, "GetModelInfo", token=wrong), call_code(server, "Generate", prompt=marker),
             call_code(server, "Generate", prompt=marker, chat=True),
             call_code(server, "CompareGenerations", prompt=marker),
             call_code(server, "Generate", prompt=marker, token=wrong)]
    time.sleep(1)
    log, metrics = server.log.read_text(errors="replace"), server.metrics_text()
    found = {}
    for name, secret in (("token", server.token), ("wrong_token", wrong), ("prompt", marker)):
        found[f"{name}_in_log"] = bool(secret) and secret in log
        found[f"{name}_in_metrics"] = bool(secret) and secret in metrics
    return {"codes": codes, **found}


def reflection_code(server) -> str:
    """What a reflection client gets: OK (a service list) or the refusal's code."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    try:
        with channel(server) as ch:
            ProtoReflectionDescriptorDatabase(ch).get_services()
        return "OK"
    except grpc.RpcError as e:
        return code_name(e)


def alpha_lru(server, alphas: int, cap: int) -> dict:
    """One compare per distinct alpha: loaded scaled variants stay <= cap, adapter directories on disk stay
    <= fixed + cap, and process memory does not grow with the number of alphas. The server's adapter directory
    is the one that holds the first of these alphas (no other caller uses them)."""
    Info = request_class("GetModelInfo")
    start = process_stats(server)
    peak_scaled = peak_dirs = 0
    adapter_dir: Path | None = None
    codes: dict[str, int] = {}
    t0 = time.monotonic()
    with channel(server) as ch:
        md = metadata(server)
        fixed = [v for v in rpc(ch, "GetModelInfo")(Info(), metadata=md, timeout=30).variants
                 if not v.startswith("scaled_")]
        for i in range(alphas):
            request = request_class("CompareGenerations")(text="The capital of France is", variants=["base"],
                                                          alphas=[1.0 + (i + 1) / 4096],
                                                          sampling={"max_tokens": 1, "temperature": 0.0})
            try:
                response = rpc(ch, "CompareGenerations")(request, metadata=md, timeout=120)
                code = "OK"
                adapter_dir = adapter_dir or adapter_dir_holding(response.arms[-1].variant)
            except grpc.RpcError as e:
                code = code_name(e)
            codes[code] = codes.get(code, 0) + 1
            if i % 25 == 0 or i == alphas - 1:
                variants = rpc(ch, "GetModelInfo")(Info(), metadata=md, timeout=30).variants
                peak_scaled = max(peak_scaled, sum(v.startswith("scaled_") for v in variants))
                if adapter_dir is not None:
                    peak_dirs = max(peak_dirs, adapter_count(adapter_dir))
    end = process_stats(server)
    return {"alphas": alphas, "cap": cap, "codes": codes, "seconds": round(time.monotonic() - t0, 1),
            "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
            "fixed_variants": len(fixed), "peak_scaled_variants": peak_scaled,
            "peak_adapter_dirs": peak_dirs if adapter_dir is not None else None,
            "adapter_dirs_bound": len(fixed) + cap,
            "frontend_rss_mib": [round(start["frontend_rss_mib"], 1), round(end["frontend_rss_mib"], 1)],
            "engine_rss_mib": [round(start["engine_rss_mib"], 1), round(end["engine_rss_mib"], 1)],
            "fds": [start["fds"], end["fds"]]}


def locked_down_flags(cap: int) -> list[str]:
    """A locked-down server's flags (with mutual TLS from make_mtls): no reflection, no canary (its requests
    would blur "idle"), at most `cap` scaled variants, low limits. The test suite's servers["tls"] has them too."""
    return ["--no-reflection", "--canary-interval", "0", "--max-scaled-variants", str(cap), "--max-concurrent", "2",
            "--max-queue", "2"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphas", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=8, help="--max-scaled-variants of the server")
    args = parser.parse_args()
    before = adapter_files()

    def measure(server) -> dict:
        return {"mtls": mtls(server), "auth": auth_every_rpc(server), "secrets": secrets_not_logged(server),
                "reflection": reflection_code(server), "alpha_lru": alpha_lru(server, args.alphas, args.cap)}

    def finish(result: dict) -> None:
        result["adapter_dirs_left"] = sorted(set(adapter_files()) - set(before))
        result["server_flags"] += ["--auth-token", "--tls-cert", "--tls-key", "--tls-client-ca"]

    with tempfile.TemporaryDirectory(prefix="superweights-mtls-") as certs:
        campaign("security", locked_down_flags(args.cap), measure, finish, token=TOKEN, tls=make_mtls(Path(certs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
