"""The one place where domain errors become gRPC statuses, and where every RPC is counted.

Servicer methods are wrapped with `unary` or `streaming`; they raise domain errors
(`tuneloop.server.errors`) and never pick a status code themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..errors import status_for
from ..metrics import Metrics

log = logging.getLogger(__name__)

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def _fail(metrics: Metrics, method: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    metrics.rpc_done(method, code.name)
    await context.abort(code, message)


def unary(method: str) -> Callable[[Callable[..., Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    """Wrap a unary-response servicer method of a class that has a `metrics` attribute."""

    def wrap(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Resp:
            try:
                response = await fn(self, request, context)
            except asyncio.CancelledError:
                self.metrics.rpc_done(method, grpc.StatusCode.CANCELLED.name)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status by the one table
                await _fail(self.metrics, method, exc, context)
                raise  # unreachable: abort raises
            self.metrics.rpc_done(method, grpc.StatusCode.OK.name)
            return response

        return handler

    return wrap


def streaming(method: str) -> Callable[[Callable[..., AsyncIterator[Resp]]], Callable[..., AsyncIterator[Resp]]]:
    """Wrap a server-streaming servicer method (an async generator)."""

    def wrap(fn: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except asyncio.CancelledError:
                self.metrics.rpc_done(method, grpc.StatusCode.CANCELLED.name)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status by the one table
                await _fail(self.metrics, method, exc, context)
                raise
            self.metrics.rpc_done(method, grpc.StatusCode.OK.name)

        return handler

    return wrap
