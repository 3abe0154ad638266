"""Domain errors and the one table that maps them to gRPC status codes.

Code below the servicers raises these; `status_for` is the only place that picks a status code,
so every RPC answers the same failure the same way, with a message a person can act on.
"""

from __future__ import annotations

import grpc


class TuneloopError(Exception):
    """Base of every error that reaches a caller with a precise status."""


class InvalidArgument(TuneloopError):
    """The request is malformed or out of range; the message says which field to change."""


class NotFound(TuneloopError):
    """A named thing (adapter, version, completion) does not exist."""


class AlreadyExists(TuneloopError):
    """An id was reused with different content."""


class FailedPrecondition(TuneloopError):
    """The request is valid but the system is not in a state to serve it."""


class ResourceExhausted(TuneloopError):
    """A limit was hit (queue full, message too large)."""


class Unauthenticated(TuneloopError):
    """No valid credentials were sent."""


class PermissionDenied(TuneloopError):
    """The credentials do not carry the role this RPC needs."""


class Unavailable(TuneloopError):
    """A dependency cannot serve right now (engine or store); retry elsewhere or later."""


class EngineUnavailable(Unavailable):
    """The engine is not running (starting, dead, or shutting down)."""


class RequestFailed(TuneloopError):
    """The engine failed this one request but is still alive."""


_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (RequestFailed, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception; unknown errors are INTERNAL."""
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
