"""Python SDK for tuneloop: generate completions and send feedback on them, with no protobuf in sight.

    from tuneloop.client import Client

    with Client("localhost:50051", api_key="...") as client:
        result = client.generate("The capital of France is", max_tokens=16)
        client.thumbs_up(result.completions[0].completion_id, rater_id="alice")

`AsyncClient` has the same methods for asyncio. Every method raises only `TuneloopError`
subclasses, one per gRPC status code (see `tuneloop.client.errors`).
"""

from .admin import AdapterInfo, CanaryInfo, VersionInfo
from .client import AsyncClient, Client
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TuneloopError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from .feedback import Comment, Correction, FeedbackAck, FeedbackEvent, Preference, Rating, Thumbs
from .generation import Completion, GenerateResult, StreamChunk, TokenLogprob

__all__ = [
    "AdapterInfo",
    "CanaryInfo",
    "VersionInfo",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "Comment",
    "Completion",
    "Correction",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FeedbackAck",
    "FeedbackEvent",
    "GenerateResult",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Preference",
    "Rating",
    "ResourceExhaustedError",
    "StreamChunk",
    "Thumbs",
    "TokenLogprob",
    "TuneloopError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]
