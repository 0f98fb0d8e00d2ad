"""Short versions of the reliability campaigns (reliability/, issue 12), on the shared servers of tests/conftest.py:
1,000 fuzzed requests, malformed bytes, a 30-second load and the auth checks on servers["auth"]; mutual TLS,
reflection off, 200 cancellations, the alpha LRU and, last of all its users, SIGTERM under load on servers["tls"]
(marked ends_server, which conftest runs at the end of the session); the model cache's faults on private copies of
the cache. The engine core killed under load is tests/test_any_model.py's last test. The long runs:
`python -m reliability.<name>` (reliability/RESULTS.md).

Tests marked xfail(strict=True) are bugs found here whose fix is outside this module (named in each reason):
they start passing, and then fail as XPASS, once the fix is in; remove the marker then.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability import common, faults, fuzz, security
from reliability.cancel import run_storm
from reliability.load import run_load
from tests.conftest import assert_clean_engine_death

pytestmark = pytest.mark.slow


# -- validation without a server -------------------------------------------------------------------------------
def test_limits_that_cannot_serve_are_refused():
    """--max-concurrent 0 would queue every engine-bound call forever: a one-line error at start, exit 2."""
    from superweights.compression.errors import UserError
    from superweights.server.service import Limits
    from tests.conftest import run_cli
    from tests.test_cli_errors import assert_one_line_error

    for bad in ({"max_concurrent": 0}, {"max_queue": -1}, {"max_tokens": 0}):
        with pytest.raises(UserError):
            Limits(**bad)
    assert_one_line_error(run_cli("-q", "serve", "--max-concurrent", "0", timeout=120), "--max-concurrent")


def test_default_max_tokens_never_exceeds_the_limit():
    from google.protobuf import message_factory

    from superweights.server.service import Limits, sampling_from_proto

    sampling = common.request_class("Generate").DESCRIPTOR.fields_by_name["sampling"].message_type
    empty = message_factory.GetMessageClass(sampling)()
    assert sampling_from_proto(empty, Limits(max_tokens=32)).max_tokens == 32
    assert sampling_from_proto(empty, Limits()).max_tokens == 64


def test_malformed_bytes_are_refused_before_the_servicer():
    """server.app.MalformedRequests alone, on an in-process grpc.aio server whose servicer has no engine: bytes
    that do not parse are INVALID_ARGUMENT (counted), bytes that do reach the servicer (UNAVAILABLE: no engine)."""
    import asyncio

    import grpc
    from prometheus_client import CollectorRegistry

    from superweights.server.interceptors import MalformedRequests
    from superweights.server.metrics import Metrics
    from superweights.server.service import Limits, SuperWeightService
    from superweights.v1 import superweights_pb2_grpc as pb_grpc

    async def codes() -> dict[str, tuple[str, str]]:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        server = grpc.aio.server(interceptors=[MalformedRequests(metrics)])
        pb_grpc.add_SuperWeightServiceServicer_to_server(SuperWeightService(metrics, Limits()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                for method in common.METHODS:
                    for name, payload in (("garbage", b"\xff" * 8), ("valid", b"")):
                        call = common.rpc(ch, method, raw=True)(payload, timeout=10)
                        try:
                            await call if method != "Generate" else [m async for m in call]
                        except grpc.aio.AioRpcError as e:
                            seen[f"{method} {name}"] = (e.code().name, e.details())
            seen["counted"] = registry.get_sample_value("superweights_requests_total",
                                                        {"method": "Generate", "code": "INVALID_ARGUMENT"})
        finally:
            await server.stop(0)
        return seen

    seen = asyncio.run(codes())
    for method in common.METHODS:
        code, details = seen[f"{method} garbage"]
        assert code == "INVALID_ARGUMENT" and fuzz.actionable(details) and "protobuf" in details, seen
        assert seen[f"{method} valid"][0] == "UNAVAILABLE", seen  # parsed, served: no engine yet
    assert seen["counted"] == 1


# -- on servers["auth"]: a token, plaintext, the canary every minute --------------------------------------------
@pytest.fixture(scope="module")
def auth(servers):
    return servers["auth"]


def test_fuzz_1000_requests(auth):
    """Every RPC and field, raw bytes and the issue's hostile list: no INTERNAL or other failure, every refusal
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message a person can act on, no traceback in the server log, the
    server unchanged. Generations are capped at 2 tokens here (the long run keeps the drawn lengths)."""
    result = fuzz.run_fuzz(auth, n=1000, seed=12, workers=8, max_generated=fuzz.SHORT_RUN_TOKENS)
    print(f"\nfuzz: {result['requests']} requests in {result['seconds']} s, codes {result['codes']}")
    assert result["internal"] == 0 and result["failures"] == 0, result["failure_examples"]
    assert result["malformed_not_invalid_argument"] == 0, result["malformed_examples"]
    assert result["unactionable"] == 0, result["unactionable_examples"]
    assert result["validation_gaps"] == 0, result["validation_gap_examples"]
    assert result["over_strict"] == 0, result["over_strict_examples"]
    assert result["too_large_not_resource_exhausted"] == 0 and result["other_codes"] == 0, result["other_examples"]
    assert result["server_alive"] and result["health_after"] == "SERVING" and result["unfinished_after"] == 0
    assert result["tracebacks_in_log"] == 0, result["log_errors"]
    assert result["golden_unchanged"]


def test_malformed_bytes_are_invalid_argument(auth):
    """Found by the fuzz: bytes that do not parse came back UNKNOWN "Unexpected <class DecodeError>" with a
    traceback in the log (grpc.aio answers so for any exception in a request deserializer). Now INVALID_ARGUMENT
    with a message a person can act on, the same with or without a token, and nothing in the log."""
    import random

    log_start = auth.log.stat().st_size
    tried = 0
    for method in common.METHODS:
        for payload in fuzz.raw_payloads(method, [], 12, random.Random(0)):
            if not fuzz.malformed(method, payload):
                continue
            tried += 1
            with common.channel(auth) as ch:
                outcome = fuzz.send(ch, auth, fuzz.Case(method, "raw", payload, "malformed"), timeout=30)
            assert outcome.code == "INVALID_ARGUMENT", (method, payload, outcome.code, outcome.details)
            assert fuzz.actionable(outcome.details) and "protobuf" in outcome.details, outcome.details
    assert tried >= 2 * len(common.METHODS)
    anonymous = type("Anonymous", (), {"token": None})()  # fuzz.send takes the token from its server argument
    with common.channel(auth) as ch:
        outcome = fuzz.send(ch, anonymous, fuzz.Case("Generate", "raw", b"\xff" * 8, "malformed"), timeout=30)
    assert outcome.code == "UNAUTHENTICATED", outcome  # auth is checked before the bytes are looked at
    log = auth.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in log and "DecodeError" not in log, log[-2000:]


def test_token_id_flood_is_refused_at_once(auth):
    """A million token ids (4 MiB) are refused by their count, without a scan that blocks the event loop."""
    Generate = common.request_class("Generate")
    request = Generate(token_ids={"ids": [5] * 1_000_000}, sampling={"max_tokens": 2})
    start = time.perf_counter()
    with common.channel(auth) as ch:
        outcome = fuzz.send(ch, auth, fuzz.Case("Generate", "hostile", request, "refuse"), timeout=30)
    assert outcome.code == "INVALID_ARGUMENT" and "exceeds the context" in outcome.details
    assert time.perf_counter() - start < 2


def test_prompt_of_dropped_characters_is_invalid_argument(auth):
    """Found by the long fuzz run: "\\x06" tokenizes to no ids, and vLLM's own refusal of an empty prompt (a
    VLLMValidationError, not a ValueError) came back INTERNAL."""
    request = common.request_class("Generate")(text="\x06", sampling={"max_tokens": 2})
    with common.channel(auth) as ch:
        outcome = fuzz.send(ch, auth, fuzz.Case("Generate", "hostile", request, "refuse"), timeout=30)
    assert outcome.code == "INVALID_ARGUMENT" and "no tokens" in outcome.details, outcome


def test_load_30_seconds(auth):
    """32 clients for 30 s against --max-concurrent 2 --max-queue 2: only OK and RESOURCE_EXHAUSTED, fds and
    asyncio tasks back to where they started (idle), the golden generation unchanged."""
    result = run_load(auth, clients=32, seconds=30, window=10)
    print(f"\nload: {result['codes']}, p99 {result['p99_s']:.1f} s, fds {result['fds_start']} -> "
          f"{result['fds_end']}, asyncio tasks {result['asyncio_tasks_start']} -> {result['asyncio_tasks_end']}, "
          f"RSS {result['first_window_rss_mib']} -> {result['last_window_rss_mib']} MiB")
    assert set(result["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, result["codes_by_kind"]
    assert result["codes"].get("OK", 0) > 0 and result["codes"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert result["fds_end"] <= result["fds_start"] + 2
    assert result["asyncio_tasks_back_to_idle"], (result["asyncio_tasks_start"], result["asyncio_tasks_end"])
    assert result["golden_unchanged"] and result["server_alive"]


def test_auth_on_every_rpc(auth):
    result = security.auth_every_rpc(auth)
    for method in common.METHODS:
        assert result[f"{method} none"] == "UNAUTHENTICATED", result
        assert result[f"{method} empty_bearer"] in ("UNAUTHENTICATED", "PERMISSION_DENIED"), result
        assert result[f"{method} wrong"] == "PERMISSION_DENIED", result
        assert result[f"{method} right"] == "OK", result
    assert result["health without token"] == "SERVING"


def test_tokens_and_prompts_are_never_logged(auth):
    result = security.secrets_not_logged(auth)
    # the calls were made: a wrong token refused, the marked prompts served (plain, chat, compare)
    assert result["codes"] == ["PERMISSION_DENIED", "OK", "OK", "OK", "PERMISSION_DENIED"], result
    assert not any(v for k, v in result.items() if k != "codes"), result


# -- on servers["tls"]: mutual TLS, no reflection, no canary, at most 2 scaled variants -------------------------
@pytest.fixture(scope="module")
def tls(servers):
    return servers["tls"]


def test_mutual_tls(tls):
    result = security.mtls(tls)
    assert result["right_certificate"] == "OK" and result["right_certificate_generate"] == "OK", result
    for refused in ("no_client_certificate", "other_ca_certificate", "plaintext", "health_without_certificate"):
        assert result[refused] == "UNAVAILABLE", result  # the handshake fails: no RPC ever reaches the server


def test_reflection_off(tls):
    assert security.reflection_code(tls) == "UNIMPLEMENTED"


def test_cancellation_storm_200(tls):
    """200 calls cancelled at random points (4 by killing their client process): the engine idle within 1 s of the
    last cancel, nothing left over (asyncio tasks back to idle), the golden generation unchanged. On this server:
    no canary, whose own requests would blur "idle"."""
    result = run_storm(tls, calls=200, seed=7, workers=2, client_kills=4, streams_per_client=1)
    print(f"\nstorm: {result['by_kind_and_code']}, idle {result['last_cancel_to_idle_seconds']} s after the last, "
          f"asyncio tasks {result['asyncio_tasks_before']} -> {result['asyncio_tasks_after']}")
    assert result["unexpected"] == 0 and result["refused"] <= 0.25 * result["calls"], result["by_kind_and_code"]
    assert result["last_cancel_to_idle_seconds"] <= 1, result
    assert result["golden_unchanged"] and result["server_alive"]
    assert result["fds_after"] <= result["fds_before"] and result["open_files_after"] <= result["open_files_before"]
    assert result["asyncio_tasks_back_to_idle"], (result["asyncio_tasks_before"], result["asyncio_tasks_after"])
    assert result["variants_after"] - result["variants_before"] <= 2  # the cap of this server
    for directory, count in result["adapters_after"].items():
        assert count <= result["adapters_before"].get(directory, 0) + 2


def test_alpha_lru_stays_bounded(tls):
    """20 distinct alphas through a cap of 2: loaded variants and adapter directories on disk stay bounded."""
    result = security.alpha_lru(tls, alphas=20, cap=2)
    assert result["codes"] == {"OK": 20}, result
    assert result["peak_scaled_variants"] <= 2
    assert result["adapter_dir"] is not None and result["peak_adapter_dirs"] <= result["adapter_dirs_bound"], result


@pytest.mark.ends_server("session")
def test_sigterm_under_load(tls):
    """2 streams running and 2 queued (the front end's share of --max-concurrent 4 --max-queue 4) at SIGTERM:
    health stops saying SERVING, a new call is refused, all four complete with every token, every front end
    drains and the server exits 0 within its grace (60 s)."""
    result = faults.sigterm_under_load(tls, running=2, queued=2, max_tokens=32)
    print(f"\nSIGTERM: {result}")
    assert result["queued_at_sigterm"] == 2 and result["completed"] == 4 and result["hung"] == 0, result
    assert result["new_call_code"] == "UNAVAILABLE" and result["health_after_sigterm"] != "SERVING", result
    assert result["exit_code"] == 0 and result["exited_after_s"] < 60, result


@pytest.mark.ends_server("session")
def test_engine_core_sigkill_in_one_process_server(auth):
    """The one-process server's engine core SIGKILLed with a stream and a compare inside it (the two-front-end
    case: tests/test_any_model.py): health stops saying SERVING within 5 s, both calls end UNAVAILABLE, a new call
    is refused, the process exits 1 and leaves no engine process."""
    assert_clean_engine_death(faults.engine_kill_under_load(auth, streams=1, compares=1))


# -- the model cache, on private copies ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_checkpoint():
    """The default model's checkpoint in the real cache (converted once, then reused)."""
    from superweights.compression.models import resolve_checkpoint

    return resolve_checkpoint(None)


@pytest.fixture
def private_cache(tmp_path, monkeypatch, reference_checkpoint):
    """A copy of the cache (GGUF and converted checkpoint) as $SUPERWEIGHTS_CACHE; conversions are replaced by a
    copy of the real converted checkpoint (the conversion itself takes a minute and is not what is tested)."""
    from superweights.compression import models

    reference = reference_checkpoint.path
    cache = faults.copy_cache(tmp_path / "cache")
    monkeypatch.setenv("SUPERWEIGHTS_CACHE", str(cache))
    conversions = []

    def convert(gguf: Path, out: Path) -> None:
        conversions.append(out)
        with models.replacing_dir(out) as tmp:
            for f in Path(reference).iterdir():  # a manifest, where the real conversion writes one, included
                shutil.copy2(f, tmp / f.name)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return cache, conversions, reference_checkpoint.sha256


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_cached_checkpoint_is_rebuilt(private_cache, damage):
    from superweights.compression.models import resolve_checkpoint

    cache, conversions, reference_sha = private_cache
    (checkpoint,) = (cache / "models").iterdir()
    weights = checkpoint / "model.safetensors"
    assert resolve_checkpoint(None).sha256 == reference_sha  # memoises the hash by size and mtime
    stat = weights.stat()
    with open(weights, "r+b") as f:
        if damage == "truncated":
            f.truncate(stat.st_size // 2)
        else:  # one byte flipped, size and mtime kept
            f.seek(stat.st_size // 2)
            byte = f.read(1)[0]
            f.seek(stat.st_size // 2)
            f.write(bytes([byte ^ 0xFF]))
    if damage == "altered":
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resolved = resolve_checkpoint(None)
    assert conversions and resolved.sha256 == reference_sha
    assert weights.stat().st_size == stat.st_size


CONCURRENT_PREPARE = """
import shutil, sys, time
from pathlib import Path
import superweights.compression.models as models

def convert(gguf, out):
    with open(sys.argv[1], "a") as log:
        log.write("converting\\n")
    time.sleep(2)
    with models.replacing_dir(out) as tmp:
        for f in Path(sys.argv[2]).iterdir():
            shutil.copy2(f, tmp / f.name)

models._convert_gguf = convert
print(models.resolve_checkpoint(None).sha256)
"""


def test_two_processes_prepare_the_model_once(tmp_path, reference_checkpoint):
    cache = faults.copy_cache(tmp_path / "cache", model=False)
    log = tmp_path / "conversions.log"
    env = dict(os.environ, SUPERWEIGHTS_CACHE=str(cache))
    args = [sys.executable, "-c", CONCURRENT_PREPARE, str(log), str(reference_checkpoint.path)]
    processes = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True, cwd=common.REPO)
                 for _ in range(2)]
    shas = [p.communicate(timeout=300)[0].strip() for p in processes]
    assert all(p.returncode == 0 for p in processes) and shas[0] == shas[1] == reference_checkpoint.sha256
    assert log.read_text().count("converting") == 1


@pytest.mark.skipif(not faults.can_mount(), reason="needs to mount a tmpfs (root)")
def test_read_only_cache_is_a_clear_error(tmp_path):
    from tests.test_cli_errors import assert_one_line_error

    with faults.mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        done = subprocess.run([common.SUPERWEIGHTS, "-q", "model", "prepare"], capture_output=True, text=True,
                              env={**os.environ, "SUPERWEIGHTS_CACHE": str(mount / "cache")},
                              timeout=120)
    assert_one_line_error(done, "cache", "SUPERWEIGHTS_CACHE")
