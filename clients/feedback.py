"""FeedbackService: judge served completions by id, one event at a time or as a bulk stream.

An event is one rater's judgement of one kind (`Thumbs`, `Rating`, `Comment`, `Correction`,
`Preference`), with an optional comment and reason tags. Give `event_id` to make re-sending safe:
the server stores an id once and answers a repeat with `duplicate=True`.
"""

from __future__ import annotations

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
_CHOICES: dict[str, pb.PairwiseChoice] = {
    "first": pb.PAIRWISE_CHOICE_FIRST,
    "second": pb.PAIRWISE_CHOICE_SECOND,
    "tie": pb.PAIRWISE_CHOICE_TIE,
}


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
    """One rater's judgement, for `submit_feedback` and `submit_feedback_bulk`."""

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

    In a bulk stream a refused event gets an ack with `error` set (the stream goes on) and
    `stream_index`, its position among the events sent.
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


def stream_ack_from_pb(m: pb.FeedbackAck) -> FeedbackAck:
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
        stream_index=m.stream_index,
        error=error,
    )


def _events_to_pb(
    events: Iterable[FeedbackEvent] | AsyncIterable[FeedbackEvent],
) -> Iterator[pb.FeedbackEvent] | AsyncIterator[pb.FeedbackEvent]:
    if isinstance(events, AsyncIterable):
        return _aevents_to_pb(events)
    return (e.to_pb() for e in events)


async def _aevents_to_pb(events: AsyncIterable[FeedbackEvent]) -> AsyncIterator[pb.FeedbackEvent]:
    async for e in events:
        yield e.to_pb()


class EventOptions(TypedDict, total=False):
    """Keyword arguments every feedback method takes."""

    event_id: str | None
    reasons: Sequence[str] | None


AckT = TypeVar("AckT")
AckStreamT = TypeVar("AckStreamT")


class FeedbackMethods(ServiceMethods, Generic[AckT, AckStreamT]):
    """The feedback calls, shared by `Client` (plain results) and `AsyncClient` (awaitables).

    Each returns the `FeedbackAck` once the event is committed, and raises `NotFoundError` for an
    unknown completion or group id, `AlreadyExistsError` for an event id reused with other content,
    `InvalidArgumentError` for a malformed event.
    """

    def submit_feedback(self, event: FeedbackEvent) -> AckT:
        request = event.to_pb()
        stub = self._transport.stub(FeedbackServiceStub)
        ack: AckT = self._transport.unary(stub.SubmitFeedback, request, ack_from_pb)
        return ack

    def submit_feedback_bulk(self, events: Iterable[FeedbackEvent] | AsyncIterable[FeedbackEvent]) -> AckStreamT:
        """Streams events and yields one ack per event, in order, each after its event is committed.

        A refused event does not stop the stream: its ack has `error` set. Events are read lazily,
        so a generator can feed any number of them. `AsyncClient` also takes an async iterable.
        """
        stub = self._transport.stub(FeedbackServiceStub)
        acks: AckStreamT = self._transport.stream_stream(
            stub.SubmitFeedbackStream, _events_to_pb(events), stream_ack_from_pb
        )
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
