"""Several front ends on one engine core (`serve --front-ends 2`): the shared mutual-TLS server of conftest. Both
processes listen on the port, new connections spread over them, a scaled arm made through one serves from the
other, and one /metrics sums them. Their deaths and SIGTERM: tests/test_any_model.py and test_reliability.py."""

import grpc
import psutil
import pytest

from reliability.common import credentials, front_end_processes, metric_values
from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def tls(servers):
    return servers["tls"]


def connect(server) -> grpc.Channel:
    """A channel with a connection of its own: grpc otherwise shares one connection between channels to the same
    target, and every call would reach the same front end."""
    return grpc.secure_channel(server.target, credentials(server), options=[("grpc.use_local_subchannel_pool", 1)])


def front_end_of(channel: grpc.Channel) -> int:
    return pb_grpc.SuperWeightServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60).front_end


@pytest.fixture(scope="module")
def by_front_end(tls):
    """An open channel to each front end: new connections until both have answered (the kernel spreads them)."""
    found: dict[int, grpc.Channel] = {}
    for _ in range(64):
        channel = connect(tls)
        index = front_end_of(channel)
        if index in found:
            channel.close()
        else:
            found[index] = channel
        if len(found) == 2:
            break
    yield found
    for channel in found.values():
        channel.close()


def test_every_front_end_listens_on_the_port(tls):
    front_ends = front_end_processes(tls)
    assert len(front_ends) == 2
    for process in front_ends:
        listening = [c for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        assert any(c.laddr.port == tls.port for c in listening), (process.pid, listening)


def test_new_connections_reach_both_front_ends(by_front_end):
    assert sorted(by_front_end) == [0, 1]
    for index, channel in by_front_end.items():
        info = pb_grpc.SuperWeightServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        assert (info.front_ends, info.front_end) == (2, index)
        assert info.tensor_parallel_size == 1 and info.pipeline_parallel_size == 1 and info.executor


def test_a_scaled_arm_made_in_one_front_end_serves_from_the_other(by_front_end):
    """The arm's adapter lives in the server's shared directory under an id derived from its name: front end 1
    knows scaled_1.375 without having made it, and its greedy tokens equal the compare's arm."""
    first, second = (pb_grpc.SuperWeightServiceStub(by_front_end[i]) for i in (0, 1))
    compare = first.CompareGenerations(pb.CompareGenerationsRequest(
        text="The capital of France is", variants=["base"], alphas=[1.375], sampling=pb.SamplingParams(**GREEDY)),
        timeout=120)
    assert [a.variant for a in compare.arms] == ["base", "scaled_1.375"]
    assert "scaled_1.375" in second.GetModelInfo(pb.GetModelInfoRequest(), timeout=60).variants
    stream = second.Generate(pb.GenerateRequest(text="The capital of France is", variant="scaled_1.375",
                                                sampling=pb.SamplingParams(**GREEDY)), timeout=120)
    assert [i for message in stream for i in message.token_ids] == list(compare.arms[1].token_ids)


def test_one_metrics_endpoint_sums_the_front_ends(tls, by_front_end):
    """Ten calls through each front end count twenty in superweights_requests_total; vLLM's own series, which the
    Prometheus rules and the dashboard read, are there too."""
    def served_infos() -> float:
        return metric_values(tls, "superweights_requests").get((("code", "OK"), ("method", "GetModelInfo")), 0.0)

    before = served_infos()
    for channel in by_front_end.values():
        for _ in range(10):
            front_end_of(channel)
    assert served_infos() - before == 20
    families = {name for name in _families(tls)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:time_to_first_token_seconds",
                 "superweights_asyncio_tasks", "superweights_engine_unfinished_requests"):
        assert name in families, name


def _families(server) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return [family.name for family in text_string_to_metric_families(server.metrics_text())]
