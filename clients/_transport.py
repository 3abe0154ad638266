"""Channels and calls: the only code that differs between the sync and the asyncio client.

The service modules (`generation`, `feedback`, ...) build requests and convert responses once, and
hand the call itself to a transport. `SyncTransport` returns results; `AsyncTransport` returns
awaitables and async iterators. Both attach the API key and the default timeout to every call and
turn every failed call into a `TuneloopError` subclass.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from .balancing import balanced_target, channel_options, split_targets
from .errors import error_from_rpc, invalid_argument

Resp = TypeVar("Resp")
T = TypeVar("T")
C = TypeVar("C")
StubT = TypeVar("StubT")

DEFAULT_TARGET = "localhost:50051"


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to connect.

    `target` is one "host:port", or several replicas (a list, or one string joined by commas).
    Several are balanced (see `balancing`): each call goes to the next healthy replica, and calls
    safe to repeat are retried on another when one is unavailable. `balance=True` does the same
    for one target (a DNS name with one address per replica); None balances exactly when there
    are several targets, so a single target connects as it always has.

    TLS is used when `tls` is set or any of `tls_ca`, `tls_cert`, `tls_key` is given; without
    `tls_ca` the system's root certificates verify the server. `tls_cert` + `tls_key` (both or
    neither) present a client certificate for mutual TLS.
    """

    target: str | Sequence[str] = DEFAULT_TARGET
    api_key: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float | None = None  # seconds per call; None waits as long as the call takes
    balance: bool | None = None
    targets: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.target:
            raise invalid_argument("target is empty; use host:port")
        object.__setattr__(self, "targets", split_targets(self.target))
        if self.balance is None:
            object.__setattr__(self, "balance", len(self.targets) > 1)
        elif not self.balance and len(self.targets) > 1:
            raise invalid_argument(f"balance=False needs one target, got {len(self.targets)}: {list(self.targets)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise invalid_argument("tls_cert and tls_key go together: give both for mutual TLS, or neither")
        if self.timeout is not None and not self.timeout > 0:
            raise invalid_argument(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise invalid_argument("api_key is empty; omit it or pass the key")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @property
    def display_target(self) -> str:
        return ",".join(self.targets)

    def channel_args(self) -> tuple[str, list[tuple[str, object]]]:
        """The gRPC target and channel options: the target as given for one unbalanced replica,
        else one naming every replica with the balancing service config."""
        if not self.balance:
            return self.targets[0], []
        return balanced_target(self.targets), channel_options(self.targets, uses_tls=self.uses_tls)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials read from the configured files, or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "tls_ca"),
            private_key=_read(self.tls_key, "tls_key"),
            certificate_chain=_read(self.tls_cert, "tls_cert"),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than grpc call credentials: those refuse plaintext channels, and a
        # local server without TLS may still check keys.
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise invalid_argument(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def _same(response: T) -> T:
    return response


class Transport(Protocol):
    """What the service mixins call. Results are `Any` because they are values for `Client` and
    awaitables / async iterators for `AsyncClient`; each mixin's type parameters say which."""

    @property
    def retries(self) -> bool: ...
    def stub(self, stub_class: Callable[[Any], StubT]) -> StubT: ...
    def unary(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> Any: ...
    def server_stream(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> Any: ...
    def unary_each(self, method: Callable[..., Any], calls: Any, convert: Callable[[Any, Any], Iterable[T]]) -> Any: ...
    def collect(self, items: Any) -> Any: ...


class ServiceMethods:
    """Base of the per-service method mixins, which reach their channel through `_transport`."""

    @property
    def _transport(self) -> Transport:
        raise NotImplementedError  # provided by the client class


class _Transport:
    """What both transports share: the config, the per-call arguments and the stub cache."""

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self._call_kwargs: dict[str, Any] = {"timeout": config.timeout, "metadata": config.metadata()}
        self._stubs: dict[type, Any] = {}

    @property
    def retries(self) -> bool:
        """Whether the channel may send a call again (see `balancing`): then requests must be
        safe to repeat, e.g. feedback events carry their id."""
        return bool(self.config.balance)

    def stub(self, stub_class: Callable[[Any], StubT]) -> StubT:
        """The generated stub of a service over this channel (built once)."""
        key: Any = stub_class
        if key not in self._stubs:
            self._stubs[key] = stub_class(self.channel)
        stub: StubT = self._stubs[key]
        return stub

    @property
    def channel(self) -> Any:
        raise NotImplementedError


class SyncTransport(_Transport):
    def __init__(self, config: ChannelConfig) -> None:
        super().__init__(config)
        creds = config.credentials()
        target, options = config.channel_args()
        self._channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def unary(self, method: Callable[..., Resp], request: Any, convert: Callable[[Resp], T]) -> T:
        try:
            response = method(request, **self._call_kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return convert(response)

    def server_stream(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> Iterator[T]:
        return self._iterate(lambda: method(request, **self._call_kwargs), convert)

    def unary_each(
        self, method: Callable[..., Any], calls: Iterable[tuple[Any, C]], convert: Callable[[Any, C], Iterable[T]]
    ) -> Iterator[T]:
        """One unary call per (request, context) of `calls`, one after another, read lazily; yields
        what `convert(response, context)` makes of each answer."""
        if isinstance(calls, AsyncIterable):
            raise invalid_argument("Client reads a plain iterable; use AsyncClient for an async iterable")
        return self._each(method, calls, convert)

    def _each(
        self, method: Callable[..., Any], calls: Iterable[tuple[Any, C]], convert: Callable[[Any, C], Iterable[T]]
    ) -> Iterator[T]:
        for request, context in calls:
            yield from convert(self.unary(method, request, _same), context)

    def collect(self, items: Iterable[T]) -> list[T]:
        return list(items)

    @staticmethod
    def _iterate(start: Callable[[], Any], convert: Callable[[Any], T]) -> Iterator[T]:
        # The call starts on the first next(), so an iterator that is never consumed costs nothing.
        call = start()
        try:
            for message in call:
                yield convert(message)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            # A caller that stops early (break, Ctrl-C) must not leave the server generating;
            # cancelling a finished call is a no-op.
            call.cancel()

    def close(self) -> None:
        self._channel.close()


class AsyncTransport(_Transport):
    def __init__(self, config: ChannelConfig) -> None:
        super().__init__(config)
        self._credentials = config.credentials()  # read now, so a bad file fails at construction
        self._target, self._options = config.channel_args()  # a name that does not resolve fails now too
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        # An aio channel binds to the running event loop, so it is opened on first use, inside
        # the loop, letting an AsyncClient be built anywhere (module level, a sync factory).
        if self._channel is None:
            creds, target, options = self._credentials, self._target, self._options
            self._channel = (
                grpc.aio.secure_channel(target, creds, options) if creds else grpc.aio.insecure_channel(target, options)
            )
        return self._channel

    def unary(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> Awaitable[T]:
        return self._unary(method, request, convert)

    async def _unary(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> T:
        try:
            response = await method(request, **self._call_kwargs)
        except grpc.RpcError as exc:  # AioRpcError; asyncio.CancelledError passes through
            raise error_from_rpc(exc) from None
        return convert(response)

    def server_stream(self, method: Callable[..., Any], request: Any, convert: Callable[[Any], T]) -> AsyncIterator[T]:
        return self._iterate(lambda: method(request, **self._call_kwargs), convert)

    async def unary_each(
        self,
        method: Callable[..., Any],
        calls: Iterable[tuple[Any, C]] | AsyncIterable[tuple[Any, C]],
        convert: Callable[[Any, C], Iterable[T]],
    ) -> AsyncIterator[T]:
        """One unary call per (request, context) of `calls` (plain or async), one after another;
        yields what `convert(response, context)` makes of each answer."""
        if isinstance(calls, AsyncIterable):
            async for request, context in calls:
                for item in convert(await self._unary(method, request, _same), context):
                    yield item
        else:
            for request, context in calls:
                for item in convert(await self._unary(method, request, _same), context):
                    yield item

    async def collect(self, items: AsyncIterable[T]) -> list[T]:
        return [item async for item in items]

    @staticmethod
    async def _iterate(start: Callable[[], Any], convert: Callable[[Any], T]) -> AsyncIterator[T]:
        call = start()
        try:
            async for message in call:
                yield convert(message)
        except grpc.RpcError as exc:  # AioRpcError; asyncio.CancelledError passes through
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
