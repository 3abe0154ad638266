"""API keys with roles, checked in one interceptor before any servicer runs.

Keys travel as `authorization: Bearer <key>` metadata. Health and reflection stay open so
orchestrators and grpcurl work without a key; any tuneloop method missing from the role table
needs `admin`, so a new RPC is closed until someone decides otherwise.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping

import grpc

from .metrics import Metrics

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Mapping[str, frozenset[str]], required_roles: Mapping[str, str], metrics: Metrics) -> None:
        self._keys = dict(keys)
        self._required = dict(required_roles)
        self._metrics = metrics

    def _roles_for(self, token: str) -> frozenset[str] | None:
        # Compare every key in constant time so response timing does not reveal key prefixes.
        found = None
        for key, roles in self._keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = roles
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        role = self._required.get(method, "admin")
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                scheme, _, rest = value.partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else ""
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        short = method.rsplit("/", 1)[-1]
        if not token:
            return self._deny(
                handler,
                short,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send metadata 'authorization: Bearer <key>'",
            )
        roles = self._roles_for(token)
        if roles is None:
            return self._deny(handler, short, grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if role not in roles:
            return self._deny(
                handler,
                short,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this API key lacks the '{role}' role needed for {short}",
            )
        return handler

    def _deny(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, msg: str
    ) -> grpc.RpcMethodHandler:
        metrics = self._metrics

        async def abort(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
            metrics.rpc_done(method, code.name)
            await context.abort(code, msg)

        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(abort, **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(abort, **kw)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(abort, **kw)
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
