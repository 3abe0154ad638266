"""FeedbackService: judge served completions by id, one event at a time or in bulk.

An event is one rater's judgement of one kind (`Thumbs`, `Rating`, `Comment`, `Correction`,
`Preference`), with an optional comment and reason tags. Give `event_id` to make re-sending safe:
the server stores an id once and answers a repeat with `duplicate=True`. On a balanced channel
(several replicas), which may send a call again, the SDK gives an event without one its own id.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypedDict, TypeVar

import grpc

from tuneloop.v1 import feedback_pb2 as pb
from tuneloop.v1.feedback_pb2_grpc import FeedbackServiceStub

from ._transport import ServiceMethods
from .errors import TuneloopError, assign, error_for, invalid_argument

if TYPE_CHECKING:
    from typing_extensions import Unpack


Choice = Literal["first", "second", "tie"]
# The server's limits on one SubmitFeedbackBatch call: events, and bytes (its default
# max_message_bytes, less room for the message framing). Bulk methods split their events to fit.
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 4 * 1024 * 1024 - 64 * 1024
_CHOICES: dict[str, pb.PairwiseChoice] = {
    "first": pb.PAIRWISE_CHOICE_FIRST,
    "second": pb.PAIRWISE_CHOICE_SECOND,
    "tie": pb.PAIRWISE_CHOICE_TIE,
}


def client_event_id() -> str:
    """A fresh event id, shaped as the server's own (`fb-` + 12 hex digits of ms time + 20 random
    hex): time-ordered ids keep the store's index append-mostly."""
    return f"fb-{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def event_pb(event: FeedbackEvent, *, assign_id: bool) -> pb.FeedbackEvent:
    """`event.to_pb()`, with an id of the SDK's when `assign_id` and the event has none: a call
    the channel may repeat must carry ids, or a repeat would store the events again."""
    msg = event.to_pb()
    if assign_id and not msg.event_id:
        msg.event_id = client_event_id()
    return msg


@dataclass(frozen=True)
class Thumbs:
    completion_id: str
    up: bool

    def fill(self, event: pb.FeedbackEvent) -> None:
        if not isinstance(self.up, bool):
            raise invalid_argument(f"Thumbs.up must be True or False, got {self.up!r}")
        assign(event.thumbs, "completion_id", self.completion_id)
        event.thumbs.value = pb.THUMB_UP if self.up else pb.THUMB_DOWN


@dataclass(frozen=True)
class Rating:
    completion_id: str
    score: int  # 1 (worst) to 5 (best)

    def fill(self, event: pb.FeedbackEvent) -> None:
        if isinstance(self.score, bool) or not isinstance(self.score, int):
            raise invalid_argument(f"rating must be an integer from 1 to 5, got {self.score!r}")
        assign(event.rating, "completion_id", self.completion_id)
        assign(event.rating, "score", self.score)


@dataclass(frozen=True)
class Comment:
    """A comment alone; its text is the event's `comment`."""

    completion_id: str

    def fill(self, event: pb.FeedbackEvent) -> None:
        assign(event.comment, "completion_id", self.completion_id)


@dataclass(frozen=True)
class Correction:
    """The text the rater wanted instead of the completion."""

    completion_id: str
    text: str

    def fill(self, event: pb.FeedbackEvent) -> None:
        assign(event.correction, "completion_id", self.completion_id)
        assign(event.correction, "corrected_text", self.text)


@dataclass(frozen=True)
class Preference:
    """A choice between two completions of one prompt: by both ids, or by the group id of an n = 2
    request (then "first" is candidate 0)."""

    choice: Choice
    first_completion_id: str | None = None
    second_completion_id: str | None = None
    group_id: str | None = None

    def fill(self, event: pb.FeedbackEvent) -> None:
        if self.choice not in _CHOICES:
            raise invalid_argument(f"choice must be one of {', '.join(_CHOICES)}, got {self.choice!r}")
        by_ids = self.first_completion_id is not None or self.second_completion_id is not None
        if by_ids == (self.group_id is not None):
            raise invalid_argument("name the pair by first and second completion ids, or by group_id; not both")
        assign(event.pairwise, "first_completion_id", self.first_completion_id or "")
        assign(event.pairwise, "second_completion_id", self.second_completion_id or "")
        assign(event.pairwise, "group_id", self.group_id or "")
        event.pairwise.choice = _CHOICES[self.choice]


Kind = Thumbs | Rating | Comment | Correction | Preference


@dataclass(frozen=True)
class FeedbackEvent:
    """One rater's judgement, for `submit_feedback`, `submit_feedback_bulk` and `submit_feedback_many`."""

    rater_id: str
    kind: Kind
    event_id: str | None = None  # idempotency key; None lets the server assign one
    comment: str | None = None  # required with Comment, optional with the other kinds
    reasons: Sequence[str] = ()  # short labels such as "too-long"

    def to_pb(self) -> pb.FeedbackEvent:
        """The wire message. Raises InvalidArgumentError for what cannot be encoded; limits
        (lengths, score range, unknown ids) are the server's to check."""
        if not isinstance(self.kind, (Thumbs, Rating, Comment, Correction, Preference)):
            raise invalid_argument(
                f"kind must be Thumbs, Rating, Comment, Correction or Preference, got {type(self.kind).__name__}"
            )
        if isinstance(self.reasons, str):
            raise invalid_argument("reasons must be a list of strings, not one string")
        event = pb.FeedbackEvent()
        assign(event, "rater_id", self.rater_id)
        if self.event_id is not None:
            assign(event, "event_id", self.event_id)
        if self.comment is not None:
            assign(event, "comment_text", self.comment)
        try:
            event.reason_tags.extend(self.reasons)
        except TypeError as exc:
            raise invalid_argument(f"reasons must be strings: {exc}") from None
        self.kind.fill(event)
        return event


@dataclass(frozen=True)
class FeedbackAck:
    """The server's answer to one event, sent after the event was committed.

    In bulk (`submit_feedback_bulk`, `submit_feedback_many`) a refused event gets an ack with
    `error` set while the others are stored all the same, and every ack has `stream_index`, its
    event's position among the events sent.
    """

    event_id: str
    duplicate: bool  # the same event was already stored; nothing new was written
    sequence: int  # position in the store's feedback order; 0 on error
    superseded_event_id: str | None = None  # the earlier thumbs/rating this one replaces for training
    stream_index: int | None = None
    error: TuneloopError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def ack_from_pb(m: pb.FeedbackAck) -> FeedbackAck:
    return FeedbackAck(
        event_id=m.event_id,
        duplicate=m.duplicate,
        sequence=m.sequence,
        superseded_event_id=m.superseded_event_id or None,
    )


def stream_ack_from_pb(m: pb.FeedbackAck, stream_index: int | None = None) -> FeedbackAck:
    """An ack of a stream or a batch; `stream_index` replaces the one in the message."""
    error = None
    if m.HasField("error"):
        try:
            code = grpc.StatusCode[m.error.code_name]
        except KeyError:
            code = grpc.StatusCode.UNKNOWN
        error = error_for(code, m.error.message)
    return FeedbackAck(
        event_id=m.event_id,
        duplicate=m.duplicate,
        sequence=m.sequence,
        superseded_event_id=m.superseded_event_id or None,
        stream_index=m.stream_index if stream_index is None else stream_index,
        error=error,
    )


# (request, index of its first event among all the events sent): what each batch call carries.
_Batch = tuple[pb.SubmitFeedbackBatchRequest, int]


class _Batcher:
    """Packs events into SubmitFeedbackBatch requests of at most `batch_size` events and
    MAX_BATCH_BYTES bytes, in order. `add` returns a request as soon as it is full (not when the
    next event arrives: a slow source's full batch goes out at once) or the event does not fit."""

    def __init__(self, batch_size: int, *, assign_ids: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise invalid_argument(f"batch_size must be an integer from 1 to {MAX_BATCH_EVENTS}, got {batch_size!r}")
        self._batch_size = batch_size
        self._assign_ids = assign_ids
        self._events: list[pb.FeedbackEvent] = []
        self._bytes = 0
        self._start = 0

    def add(self, event: FeedbackEvent) -> list[_Batch]:
        msg = event_pb(event, assign_id=self._assign_ids)
        size = msg.ByteSize() + 8  # + its field tag and length prefix in the request
        ready = []
        if self._events and self._bytes + size > MAX_BATCH_BYTES and (batch := self.flush()) is not None:
            ready.append(batch)
        self._events.append(msg)
        self._bytes += size
        if len(self._events) >= self._batch_size and (batch := self.flush()) is not None:
            ready.append(batch)
        return ready

    def flush(self) -> _Batch | None:
        if not self._events:
            return None
        batch = (pb.SubmitFeedbackBatchRequest(events=self._events), self._start)
        self._start += len(self._events)
        self._events, self._bytes = [], 0
        return batch


def _batches(events: Iterable[FeedbackEvent], batch_size: int, *, assign_ids: bool = False) -> Iterator[_Batch]:
    batcher = _Batcher(batch_size, assign_ids=assign_ids)
    for event in events:
        yield from batcher.add(event)
    if (last := batcher.flush()) is not None:
        yield last


async def _abatches(
    events: AsyncIterable[FeedbackEvent], batch_size: int, *, assign_ids: bool = False
) -> AsyncIterator[_Batch]:
    batcher = _Batcher(batch_size, assign_ids=assign_ids)
    async for event in events:
        for batch in batcher.add(event):
            yield batch
    if (last := batcher.flush()) is not None:
        yield last


def batch_acks_from_pb(response: pb.SubmitFeedbackBatchResponse, start: int) -> list[FeedbackAck]:
    """The acks of one batch call, with `stream_index` counted over every event sent."""
    return [stream_ack_from_pb(m, stream_index=start + i) for i, m in enumerate(response.acks)]


class EventOptions(TypedDict, total=False):
    """Keyword arguments every feedback method takes."""

    event_id: str | None
    reasons: Sequence[str] | None


AckT = TypeVar("AckT")
AckStreamT = TypeVar("AckStreamT")
AckListT = TypeVar("AckListT")
DEFAULT_BATCH_SIZE = MAX_BATCH_EVENTS


class FeedbackMethods(ServiceMethods, Generic[AckT, AckStreamT, AckListT]):
    """The feedback calls, shared by `Client` (plain results) and `AsyncClient` (awaitables).

    Each returns the `FeedbackAck` once the event is committed, and raises `NotFoundError` for an
    unknown completion or group id, `AlreadyExistsError` for an event id reused with other content,
    `InvalidArgumentError` for a malformed event.
    """

    def submit_feedback(self, event: FeedbackEvent) -> AckT:
        request = event_pb(event, assign_id=self._transport.retries)
        stub = self._transport.stub(FeedbackServiceStub)
        ack: AckT = self._transport.unary(stub.SubmitFeedback, request, ack_from_pb)
        return ack

    def submit_feedback_bulk(
        self,
        events: Iterable[FeedbackEvent] | AsyncIterable[FeedbackEvent],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> AckStreamT:
        """Sends events in batches and yields one ack per event, in order, each after its batch is
        committed.

        Events are read lazily (a generator can feed any number of them) and sent as
        SubmitFeedbackBatch calls of up to `batch_size` events (1-1000) and 4 MiB, one call after
        another, so they are stored in the order given. A refused event does not stop the others:
        its ack has `error` set. Acks arrive a batch at a time: with a slow source, a smaller
        `batch_size` gets them sooner. An event the SDK cannot encode raises `InvalidArgumentError`
        before its batch is sent; a failed call (e.g. `UnavailableError`) raises, and the batches
        before it are stored: re-sending with the same event ids is safe. `AsyncClient` also takes
        an async iterable.
        """
        stub = self._transport.stub(FeedbackServiceStub)
        ids = self._transport.retries
        batches = (
            _abatches(events, batch_size, assign_ids=ids)
            if isinstance(events, AsyncIterable)
            else _batches(events, batch_size, assign_ids=ids)
        )
        acks: AckStreamT = self._transport.unary_each(stub.SubmitFeedbackBatch, batches, batch_acks_from_pb)
        return acks

    def submit_feedback_many(
        self,
        events: Iterable[FeedbackEvent] | AsyncIterable[FeedbackEvent],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> AckListT:
        """`submit_feedback_bulk`, answered as one list of acks (in the order of the events) once
        every batch is committed."""
        acks: AckListT = self._transport.collect(self.submit_feedback_bulk(events, batch_size=batch_size))
        return acks

    def thumbs_up(
        self, completion_id: str, rater_id: str, *, comment: str | None = None, **options: Unpack[EventOptions]
    ) -> AckT:
        return self._judge(rater_id, Thumbs(completion_id, up=True), comment, options)

    def thumbs_down(
        self, completion_id: str, rater_id: str, *, comment: str | None = None, **options: Unpack[EventOptions]
    ) -> AckT:
        return self._judge(rater_id, Thumbs(completion_id, up=False), comment, options)

    def rate(
        self, completion_id: str, rating: int, rater_id: str, *, comment: str | None = None,
        **options: Unpack[EventOptions],
    ) -> AckT:  # fmt: skip
        """Rates a completion from 1 (worst) to 5 (best)."""
        return self._judge(rater_id, Rating(completion_id, rating), comment, options)

    def comment(self, completion_id: str, text: str, rater_id: str, **options: Unpack[EventOptions]) -> AckT:
        """A free-text comment alone (no thumbs or rating)."""
        return self._judge(rater_id, Comment(completion_id), text, options)

    def correct(
        self, completion_id: str, text: str, rater_id: str, *, comment: str | None = None,
        **options: Unpack[EventOptions],
    ) -> AckT:  # fmt: skip
        """Sends the text the rater wanted instead: trained as preferred over the completion."""
        return self._judge(rater_id, Correction(completion_id, text), comment, options)

    def prefer(
        self,
        first: str | None = None,
        second: str | None = None,
        *,
        choice: Choice,
        rater_id: str,
        group_id: str | None = None,
        comment: str | None = None,
        **options: Unpack[EventOptions],
    ) -> AckT:
        """Chooses between two completions of one prompt: `prefer(id_a, id_b, choice="first", ...)`,
        or `prefer(group_id=result.group_id, choice=..., ...)` for an n = 2 result."""
        preference = Preference(choice, first_completion_id=first, second_completion_id=second, group_id=group_id)
        return self._judge(rater_id, preference, comment, options)

    def _judge(self, rater_id: str, kind: Kind, comment: str | None, options: EventOptions) -> AckT:
        unknown = set(options) - set(EventOptions.__annotations__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        event = FeedbackEvent(
            rater_id=rater_id,
            kind=kind,
            event_id=options.get("event_id"),
            comment=comment,
            reasons=options.get("reasons") or (),
        )
        return self.submit_feedback(event)
