"""`Client` (blocking) and `AsyncClient` (asyncio): one class per style, the calls of every service.

The calls themselves live in one module per service (`generation`, `feedback`, ...) as mixins that
build requests and convert responses; each client only picks its transport. A new service adds
its mixin to both base lists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from types import TracebackType
from typing import Generic, TypeVar

from ._transport import DEFAULT_TARGET, AsyncTransport, ChannelConfig, SyncTransport
from .admin import AdapterInfo, AdminMethods
from .feedback import FeedbackAck, FeedbackMethods
from .generation import GenerateResult, GenerationMethods, StreamChunk

TransportT = TypeVar("TransportT", SyncTransport, AsyncTransport)


class _ClientBase(Generic[TransportT]):
    _transport_class: type[TransportT]

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        timeout: float | None = None,
        balance: bool | None = None,
    ) -> None:
        """Connects lazily to `target` ("host:port"); the first call opens the connection.

        `target` may name several replicas: `["h1:50051", "h2:50051"]` or "h1:50051,h2:50051".
        Calls are then balanced round-robin over the replicas whose health is SERVING, and the
        calls safe to repeat are retried on another replica after UNAVAILABLE (docs/client.md).

        Args:
            api_key: sent as `authorization: Bearer <key>` on every call.
            tls: use TLS, verifying the server with the system's root certificates.
            tls_ca: PEM file of the root certificate(s) that verify the server (implies TLS).
            tls_cert, tls_key: PEM client certificate and key for mutual TLS (both or neither).
            timeout: seconds each call may take (a whole stream counts as one call); None: no limit.
            balance: balance even one target (a DNS name that resolves to every replica); None
                balances when several targets are given, False refuses several.

        Raises:
            InvalidArgumentError: inconsistent settings or an unreadable certificate file.
        """
        config = ChannelConfig(
            target=target,
            api_key=api_key,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout=timeout,
            balance=balance,
        )
        self._channel_transport: TransportT = self._transport_class(config)

    @property
    def _transport(self) -> TransportT:
        return self._channel_transport

    @property
    def target(self) -> str:
        """The replica(s) connected to, as "host:port" joined by commas."""
        return self._transport.config.display_target

    def __repr__(self) -> str:
        tls = "tls" if self._transport.config.uses_tls else "plaintext"
        return f"{type(self).__name__}({self.target!r}, {tls})"


class Client(
    _ClientBase[SyncTransport],
    GenerationMethods[GenerateResult, Iterator[StreamChunk]],
    FeedbackMethods[FeedbackAck, Iterator[FeedbackAck], list[FeedbackAck]],
    AdminMethods[AdapterInfo, list[AdapterInfo]],
):
    """Blocking client. Use as a context manager, or call `close()`; safe to share across threads."""

    _transport_class = SyncTransport

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(
    _ClientBase[AsyncTransport],
    GenerationMethods[Awaitable[GenerateResult], AsyncIterator[StreamChunk]],
    FeedbackMethods[Awaitable[FeedbackAck], AsyncIterator[FeedbackAck], Awaitable[list[FeedbackAck]]],
    AdminMethods[Awaitable[AdapterInfo], Awaitable[list[AdapterInfo]]],
):
    """asyncio client: the same methods as `Client`, awaitable (streams are async iterators).

    Use it within one event loop, as `async with AsyncClient(...) as client:` or with `await close()`.
    """

    _transport_class = AsyncTransport

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
