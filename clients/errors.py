"""The exceptions the SDK raises, one class per gRPC status code.

Every SDK method raises only `TuneloopError` subclasses: a failed RPC becomes the subclass for its
status code (`error_from_rpc`), and input the SDK can reject before sending anything raises
`InvalidArgumentError`, exactly as the server would. Callers catch the kind they can act on
(`NotFoundError`, `UnavailableError`, ...) or `TuneloopError` for everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc


class TuneloopError(Exception):
    """A failed call: `code` is the gRPC status name ("NOT_FOUND"), `message` says what to change,
    `details` holds the text trailing metadata the server attached (empty when none)."""

    def __init__(self, code: str, message: str, details: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, str] = dict(details or {})

    @property
    def status_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


class CancelledError(TuneloopError):
    """The call was cancelled (by the caller, or by the server on shutdown)."""


class UnknownError(TuneloopError):
    """The server failed without a status, or the status could not be read."""


class InvalidArgumentError(TuneloopError):
    """The request is malformed or out of range; the message names the field."""


class DeadlineExceededError(TuneloopError):
    """The call's timeout passed before the server answered."""


class NotFoundError(TuneloopError):
    """A named thing (completion, adapter, version) does not exist."""


class AlreadyExistsError(TuneloopError):
    """An id was reused with different content."""


class PermissionDeniedError(TuneloopError):
    """The credentials are valid but lack the role this call needs."""


class ResourceExhaustedError(TuneloopError):
    """A limit was hit (queue full, rate limit, message too large); retry later or send less."""


class FailedPreconditionError(TuneloopError):
    """The request is valid but the system is not in a state to serve it."""


class AbortedError(TuneloopError):
    """The call was aborted by a concurrent conflicting operation; retrying may succeed."""


class OutOfRangeError(TuneloopError):
    """A value is past the end of a valid range."""


class UnimplementedError(TuneloopError):
    """The server does not implement this call (older server, or the service is not enabled)."""


class InternalError(TuneloopError):
    """The server failed this request; the server log has the cause."""


class UnavailableError(TuneloopError):
    """The server cannot be reached or its engine is not running; retry later or elsewhere."""


class DataLossError(TuneloopError):
    """Unrecoverable data loss or corruption."""


class UnauthenticatedError(TuneloopError):
    """No valid credentials were sent (see `api_key`)."""


# The one table from status code to exception class. OK never reaches it: a call that
# succeeded does not raise.
ERROR_CLASSES: Mapping[grpc.StatusCode, type[TuneloopError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_for(code: grpc.StatusCode, message: str, details: Mapping[str, str] | None = None) -> TuneloopError:
    """The exception for a status code (`UnknownError` for a code outside the table)."""
    cls = ERROR_CLASSES.get(code, UnknownError)
    return cls(code.name, message, details)


def invalid_argument(message: str) -> InvalidArgumentError:
    """The error for input the SDK rejects before sending it, shaped as the server's would be."""
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT.name, message)


def assign(msg: Any, name: str, value: object) -> None:
    """Sets one protobuf field, reporting a value its type cannot hold (a str for an int, -1 for
    a uint32) as an InvalidArgumentError instead of protobuf's TypeError/ValueError."""
    try:
        setattr(msg, name, value)
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"{name}={value!r} is not valid: {exc}") from None


def error_from_rpc(exc: grpc.RpcError) -> TuneloopError:
    """Converts a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) to its exception."""
    # A sync RpcError is also a grpc.Call that carries the status; one raised elsewhere in grpc
    # (e.g. by a bad channel option) may not be, and then the status is unknown.
    code_fn = getattr(exc, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        return UnknownError(grpc.StatusCode.UNKNOWN.name, str(exc) or type(exc).__name__)
    details_fn = getattr(exc, "details", None)
    message = (details_fn() if callable(details_fn) else None) or code.name.lower().replace("_", " ")
    return error_for(code, message, _text_metadata(exc))


def _text_metadata(exc: grpc.RpcError) -> dict[str, str]:
    trailing_fn = getattr(exc, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    # Binary entries ("-bin" keys, bytes values) are protocol detail (e.g. grpc-status-details-bin).
    return {k: v for k, v in (trailing or ()) if isinstance(v, str) and not k.endswith("-bin")}
