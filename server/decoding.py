"""Requests whose bytes are not a valid protobuf message get INVALID_ARGUMENT, not UNKNOWN.

gRPC Python runs the request deserializer before any servicer code; when it raises, the caller
sees `UNKNOWN` with a Python class name in the text. This interceptor gives every method a
deserializer that never raises: undecodable bytes become an `Undecodable` marker, and the method
answers it with a plain message before the servicer is called. In a request stream the bad message
is found where the stream is read, which may be a task of the servicer's own: there it raises
`UndecodableMessage` (an InvalidArgument), which the servicer's error table answers, or, for a
servicer without one, this guard does; the status is set once, by the RPC's own handler. It wraps
every service (health and reflection too).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .errors import InvalidArgument
from .metrics import Metrics


class Undecodable:
    """What a request deserializer returns for bytes that do not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class UndecodableMessage(InvalidArgument):
    """A message of a request stream did not decode."""


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever a parser raises on hostile bytes
            what = getattr(deserializer, "__qualname__", "request").removesuffix(".FromString")
            return Undecodable(
                f"the request ({len(data)} bytes) is not a valid {what} message ({exc.__class__.__name__}); "
                "send a message built from the tuneloop.v1 .proto files"
            )

    return decode


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def _reject(self, method: str, message: str, context: grpc.aio.ServicerContext) -> None:
        self._metrics.rpc_done(method, grpc.StatusCode.INVALID_ARGUMENT.name)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _checked(self, method: str, request: Any, request_streaming: bool, context: Any) -> Any:
        """The request to hand the servicer: a unary one checked now, a stream checked as it is read."""
        if request_streaming:
            return self._checked_stream(method, request, context)
        if isinstance(request, Undecodable):
            await self._reject(method, request.message, context)
        return request

    def _checked_stream(self, method: str, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise UndecodableMessage(request.message)
                yield request

        return checked()

    def _wrap(self, method: str, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                checked = await self._checked(method, request, request_streaming, context)
                try:
                    async for response in behavior(checked, context):
                        yield response
                except UndecodableMessage as exc:  # a servicer that does not map errors itself
                    await self._reject(method, str(exc), context)

            return gen

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                result = behavior(await self._checked(method, request, request_streaming, context), context)
                return await result if inspect.isawaitable(result) else result
            except UndecodableMessage as exc:
                await self._reject(method, str(exc), context)

        return call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = details.method.rsplit("/", 1)[-1]
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary"
        )
        behavior = getattr(handler, kind)
        return handler._replace(  # grpc's handlers are namedtuples
            request_deserializer=_safe(handler.request_deserializer),
            **{kind: self._wrap(method, behavior, handler.request_streaming)},
        )
