"""A small synchronous Python client for a running superweights server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from superweights.v1 import superweights_pb2 as pb
from superweights.v1 import superweights_pb2_grpc as pb_grpc


def sampling(max_tokens: int = 0, temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
             seed: int | None = None, stop: list[str] | None = None, logprobs: int = 0,
             ignore_eos: bool = False) -> pb.SamplingParams:
    msg = pb.SamplingParams(max_tokens=max_tokens, top_k=top_k, stop=stop or [], logprobs=logprobs,
                            ignore_eos=ignore_eos)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(msg, name, value)
    return msg


def _prompt(prompt: str | list[int]) -> dict:
    return {"text": prompt} if isinstance(prompt, str) else {"token_ids": pb.TokenIds(ids=prompt)}


class SuperWeightClient:
    """Args:
        target: "host:port".
        token: bearer token, when the server has auth on.
        root_cert: PEM of the CA that signed the server's certificate (TLS); client_cert/client_key for mTLS.
        timeout: default deadline in seconds for every call.
    """

    def __init__(self, target: str, token: str | None = None, root_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None, timeout: float | None = 300):
        if root_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(root_cert).read_bytes(),
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.SuperWeightServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SuperWeightClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_stream(self, prompt: str | list[int], variant: str = "", chat: bool = False,
                        token_ids_only: bool = False, **sampling_args) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(sampling=sampling(**sampling_args), variant=variant, chat=chat,
                                     token_ids_only=token_ids_only, **_prompt(prompt))
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout)

    def generate(self, prompt: str | list[int], variant: str = "", chat: bool = False, token_ids_only: bool = False,
                 **sampling_args) -> dict:
        """The whole generation: text, token ids, per-token choices, finish reason and counts."""
        text, ids, tokens, last = [], [], [], None
        for message in self.generate_stream(prompt, variant, chat, token_ids_only, **sampling_args):
            text.append(message.text)
            ids.extend(message.token_ids)
            tokens.extend(message.tokens)
            last = message
        return {"text": "".join(text), "token_ids": ids, "tokens": tokens, "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens}

    def super_weights(self) -> pb.SuperWeightReport:
        """The served report, unwrapped from its GetSuperWeightsResponse."""
        response = self.stub.GetSuperWeights(pb.GetSuperWeightsRequest(), metadata=self.metadata, timeout=self.timeout)
        return response.report

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=self.timeout)

    def compare(self, prompt: str | list[int], variants: list[str] | None = None, alphas: list[float] | None = None,
                chat: bool = False, **sampling_args) -> pb.CompareGenerationsResponse:
        request = pb.CompareGenerationsRequest(sampling=sampling(**sampling_args), variants=variants or [],
                                               alphas=alphas or [], chat=chat, **_prompt(prompt))
        return self.stub.CompareGenerations(request, metadata=self.metadata, timeout=self.timeout)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
