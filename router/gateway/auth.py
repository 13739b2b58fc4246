"""API-key authentication for the gateway: a grpc.aio server interceptor in front of every service.

Every call must carry the metadata `authorization: Bearer <key>` with one of the gateway's keys
(router/gateway/api_keys.py), or it ends with UNAUTHENTICATED before reaching the service. The exceptions are
`OPEN_SERVICES`: grpc.health.v1, because Kubernetes probes (and load balancers) carry no key; health says only
SERVING or NOT_SERVING (and KServe v2's ServerLive and ServerReady, for the same reason). The HTTP front checks
its `Authorization` header with `problem` too. Reflection is not open: it lists every method, and grpcurl can send
the header (`-H 'authorization: Bearer ...'`).
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2

from router.gateway.api_keys import ApiKeys

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({health_pb2.DESCRIPTOR.services_by_name["Health"].full_name})
HEADER = "authorization"
MISSING = "this server needs an API key: send the metadata 'authorization: Bearer <key>'"
MALFORMED = "expected the metadata 'authorization: Bearer <key>'"
WRONG = "the API key is not valid for this server"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, keys: ApiKeys, open_services: frozenset[str] = OPEN_SERVICES, open_methods: frozenset[str] = frozenset()
    ):
        """`open_methods`: single methods ("/package.Service/Method") open as well (KServe's liveness and
        readiness, which probes call without a key)."""
        self.keys, self.open_services, self.open_methods = keys, open_services, open_methods

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.split("/")[1] in self.open_services or details.method in self.open_methods:
            return handler
        problem = self.problem(details.invocation_metadata or ())
        if problem is None:
            return handler
        log.info("refused %s: %s", details.method, problem)
        return _refusal(handler, problem)

    def problem(self, metadata) -> str | None:
        """None if the call carries a valid key; else what is wrong with it (never which keys exist)."""
        values = [value for key, value in metadata if key == HEADER]
        if not values:
            return MISSING
        scheme, _, key = str(values[-1]).strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return MALFORMED
        return None if self.keys.accepts(key.strip()) else WRONG


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (so requests still parse) that ends the call UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        streaming if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
