"""The gRPC server's interceptors: bearer-token auth on the superweights service, and request bytes that do not
parse refused with INVALID_ARGUMENT instead of grpc's UNKNOWN and a traceback."""

from __future__ import annotations

import hmac
import inspect

import grpc
from google.protobuf.message import DecodeError

from .metrics import Metrics
from .service import SERVICE_NAME


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer tokens on the superweights service; health and reflection stay open."""

    def __init__(self, tokens: tuple[str, ...], metrics: Metrics):
        self.tokens, self.metrics = tokens, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ())}
        header = metadata.get("authorization", "")
        if not header:
            return self._deny(handler, details, grpc.StatusCode.UNAUTHENTICATED,
                              "missing token: send metadata 'authorization: Bearer <token>'")
        token = header.removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens):
            return self._deny(handler, details, grpc.StatusCode.PERMISSION_DENIED, "token not accepted")
        return handler

    def _deny(self, handler, details, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], code.name).inc()

        async def deny(request, context):
            await context.abort(code, message)

        kind = "unary_stream" if handler.unary_stream else "unary_unary"
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(deny, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


MALFORMED = object()  # what MalformedRequests' deserializer returns for bytes that do not parse


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse as the method's message: INVALID_ARGUMENT with a message a person can act
    on, counted, not logged. grpc.aio deserializes a request before the method runs and answers any exception
    from the deserializer UNKNOWN "Unexpected <class 'DecodeError'>", with a traceback in the log (grpc's
    _cygrpc/aio/server.pyx.pxi, _handle_exceptions); so the deserializer installed here never raises: it returns
    MALFORMED, which the wrapped method refuses. Methods with a request stream (reflection) are left as they are."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[str, tuple] = {}  # method -> (its handler, the wrapped one): handlers are per method

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, self._wrap(handler, details.method))
        return cached[1]

    def _wrap(self, handler, path: str):
        method = path.rsplit("/", 1)[-1]
        parse, behavior = handler.request_deserializer, handler.unary_stream or handler.unary_unary
        message = (f"{method}: the request does not parse as its protobuf message (truncated or corrupted bytes, a "
                   f"wrong wire type, or a string that is not UTF-8); send a message built from the service's .proto")

        def deserialize(raw: bytes):
            try:
                return parse(raw)
            except DecodeError:
                return MALFORMED

        async def refuse(context) -> None:
            self.metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if inspect.isasyncgenfunction(behavior):
            async def checked(request, context):
                if request is MALFORMED:
                    await refuse(context)
                async for response in behavior(request, context):
                    yield response
        elif inspect.iscoroutinefunction(behavior):
            async def checked(request, context):
                if request is MALFORMED:
                    await refuse(context)
                return await behavior(request, context)
        else:  # a synchronous method (none here): grpc runs it in a thread, where abort cannot be awaited
            return handler
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return factory(checked, request_deserializer=deserialize, response_serializer=handler.response_serializer)
