"""Streaming clients that time one request each: our gRPC `Generate`, vLLM's OpenAI completions stream, vLLM's
gRPC server (smg-grpc-servicer). Every client sends token ids, greedy, end of sequence ignored, and returns the
time to the first token, the gaps between later tokens and the token count."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

SERVED_MODEL_NAME = "m"  # the name vLLM's OpenAI server is started with (--served-model-name)
CONNECTIONS = 8  # per client process, to our server (vLLM's OpenAI client opens one per request in flight)


@dataclass
class RequestResult:
    ttft: float  # seconds from sending to the first token
    itl: list[float] = field(default_factory=list)  # per-token gaps after the first token
    tokens: int = 0
    messages: int = 0  # streamed messages that carried tokens (several tokens each when the client fell behind)
    error: str = ""


class Timer:
    """Collects first-token and inter-token times of one streamed request."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last = None
        self.ttft = None
        self.itl: list[float] = []
        self.tokens = 0
        self.messages = 0

    def tokens_arrived(self, k: int) -> None:
        """k tokens in one message: the gap since the last message is shared evenly among them."""
        if k <= 0:
            return
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.extend([(now - self.last) / k] * k)
        self.last = now
        self.tokens += k
        self.messages += 1

    def result(self) -> RequestResult:
        return RequestResult(self.ttft or float("nan"), self.itl, self.tokens, self.messages)


class OursClient:
    """token_ids_only: the server skips detokenizing (GenerateRequest.token_ids_only), like vLLM's gRPC server.
    connections: TCP connections, streams taken in turn (gRPC sends every call of a channel over one connection,
    and a server of several front ends spreads connections, not calls)."""

    def __init__(self, port: int, token_ids_only: bool = False, connections: int = CONNECTIONS):
        import grpc

        from superweights.v1 import superweights_pb2 as pb
        from superweights.v1 import superweights_pb2_grpc as pb_grpc

        self.pb, self.token_ids_only = pb, token_ids_only
        # a local subchannel pool each: channels to one target otherwise share one connection
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(connections)]
        self.stubs = [pb_grpc.SuperWeightServiceStub(c) for c in self.channels]
        self.sent = 0

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), token_ids_only=self.token_ids_only)
        stub = self.stubs[self.sent % len(self.stubs)]
        self.sent += 1
        timer = Timer()
        async for message in stub.Generate(request):
            timer.tokens_arrived(len(message.token_ids))
        return timer.result()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class OpenAIClient:
    def __init__(self, port: int, model: str):
        import aiohttp

        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.model = model
        # no connection pool limit: aiohttp's default pool would hold a level of many streams to fewer requests
        # in flight, and count the wait for a connection as time to first token
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        timer = Timer()
        async with self.session.post(self.url, json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    timer.tokens_arrived(1)  # vLLM streams one delta per engine step and request
                elif chunk.get("usage"):
                    timer.tokens = chunk["usage"]["completion_tokens"]
        return timer.result()

    async def close(self) -> None:
        await self.session.close()


class VllmGrpcClient:
    def __init__(self, port: int):
        import grpc
        from smg_grpc_proto import vllm_engine_pb2 as pb
        from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.VllmEngineStub(self.channel)
        self.counter = 0

    async def stream(self, prompt_ids: list[int], max_tokens: int) -> RequestResult:
        pb = self.pb
        self.counter += 1
        request = pb.GenerateRequest(
            request_id=f"bench-{os.getpid()}-{self.counter}", tokenized=pb.TokenizedInput(input_ids=prompt_ids),
            sampling_params=pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True,
                                              n=1, skip_special_tokens=True),
            stream=True)
        timer = Timer()
        async for message in self.stub.Generate(request):
            if message.HasField("chunk"):
                timer.tokens_arrived(len(message.chunk.token_ids))
        return timer.result()

    async def close(self) -> None:
        await self.channel.close()




def open_client(kind: str, port: int):
    """A client of `kind` ("ours", "ours-ids", "openai" or "vllm-grpc") to the server on `port`."""
    if kind in ("ours", "ours-ids"):
        return OursClient(port, token_ids_only=kind == "ours-ids")
    if kind == "openai":
        return OpenAIClient(port, SERVED_MODEL_NAME)
    if kind == "vllm-grpc":
        return VllmGrpcClient(port)
    raise ValueError(f"unknown client {kind!r}: ours, ours-ids, openai or vllm-grpc")
