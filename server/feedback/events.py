"""Feedback on served completions as domain types: what an event is, how it is validated, what is
stored and acknowledged, and the errors a caller gets. No store, no I/O: the store depends on these.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from tuneloop.v1 import feedback_pb2 as fpb

from ..errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable

Kind = Literal["thumbs", "rating", "comment", "correction", "pairwise"]
KINDS: tuple[Kind, ...] = ("thumbs", "rating", "comment", "correction", "pairwise")
# Kinds where a rater's newer event on a completion replaces the older one for training.
SUPERSEDING_KINDS = frozenset({"thumbs", "rating"})
Choice = Literal["first", "second", "tie"]

MAX_COMMENT_BYTES = 8 * 1024
MAX_CORRECTION_BYTES = 64 * 1024
MAX_RATER_BYTES = 256
MAX_REASON_TAGS = 16
MAX_REASON_TAG_BYTES = 64
# Events per SubmitFeedbackBatch. Large enough that a batch's per-message gRPC cost is small per
# event, small enough that a batch fits one writer transaction (FeedbackServiceConfig.max_batch)
# and a full one of ordinary events stays well under the default 4 MiB message limit.
MAX_BATCH_EVENTS = 1000
EVENT_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


def json_dumps_fast(ensure_ascii: bool) -> Callable[[object], str]:
    """`json.dumps(x, ensure_ascii=...)` character for character, for flat lists of scalars and
    strings: three times per event on the writer's path. json.dumps builds its C encoder on every
    call, half of its cost on such a list; this builds it once. No cycle check (there are none)."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # no C accelerator: the plain encoder, built once
        return json.JSONEncoder(ensure_ascii=ensure_ascii).encode
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    chunks = c_make_encoder(None, json.JSONEncoder().default, quote, None, ": ", ", ", False, False, True)
    return lambda value: "".join(chunks(value, 0))


# The stored content hashes and judgement keys depend on this being json.dumps(x, ensure_ascii=False).
_json = json_dumps_fast(ensure_ascii=False)

_THUMB_FROM_PB = {fpb.THUMB_UP: True, fpb.THUMB_DOWN: False}
_CHOICE_FROM_PB: dict[int, Choice] = {
    fpb.PAIRWISE_CHOICE_FIRST: "first",
    fpb.PAIRWISE_CHOICE_SECOND: "second",
    fpb.PAIRWISE_CHOICE_TIE: "tie",
}


# --- errors: the domain classes of errors.py, plus a short reason for the rejected-events metric ---


class InvalidFeedback(InvalidArgument):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownCompletion(NotFound):
    reason = "unknown_completion"


class EventIdConflict(AlreadyExists):
    reason = "event_id_conflict"


class FeedbackBacklog(ResourceExhausted):
    reason = "backlog_full"


class StoreUnavailable(Unavailable):
    """The store could not commit (or is shutting down). Maps to UNAVAILABLE like an engine outage;
    retrying with the same event ids is safe."""

    reason = "store_unavailable"


def rejection_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", "internal_error")


def check_batch_size(n_events: int) -> None:
    """Raises InvalidFeedback when a batch holds more events than one call may."""
    if n_events > MAX_BATCH_EVENTS:
        raise InvalidFeedback(
            "batch_too_large",
            f"a batch holds at most {MAX_BATCH_EVENTS} events, got {n_events}; split it into several calls",
        )


# --- domain types ---


@dataclass(slots=True)
class FeedbackEvent:
    """One event as sent. Exactly the fields of its `kind` are set (from_pb guarantees it).

    Slots, not an instance dict: a bulk call makes a thousand of these at once, and each one's
    dict cost memory, attribute lookups and garbage-collector work. Not frozen either, though no
    code changes one after it is made (`dataclasses.replace` makes a new one): a frozen dataclass
    sets each field through `object.__setattr__`, which tripled the cost of making one. The same
    holds for FeedbackRecord and FeedbackAck, made once per event on the writer's path.
    """

    rater_id: str
    kind: Kind
    event_id: str = ""  # "" until the server assigns one
    completion_id: str = ""  # the judged completion; pairwise: the first, when named by id
    second_completion_id: str = ""  # pairwise by ids
    group_id: str = ""  # pairwise by group (of exactly two candidates)
    thumb_up: bool | None = None  # thumbs
    rating: int | None = None  # rating, 1-5
    choice: Choice | None = None  # pairwise
    corrected_text: str | None = None  # correction
    comment_text: str = ""
    reason_tags: tuple[str, ...] = ()
    # content_sha256 and judgement_key once computed (the writer needs each more than once).
    _content_sha256: str = field(default="", init=False, repr=False, compare=False)
    _judgement_key: str = field(default="", init=False, repr=False, compare=False)

    @classmethod
    def from_pb(cls, msg: fpb.FeedbackEvent) -> FeedbackEvent:
        # Positional: a bulk call converts a thousand of these on the event loop, and keyword
        # arguments built from a shared dict cost a third of the conversion.
        kind = msg.WhichOneof("kind")
        rater, event_id, comment = msg.rater_id, msg.event_id, msg.comment_text
        tags = tuple(msg.reason_tags) if msg.reason_tags else ()
        if kind == "thumbs":
            t = msg.thumbs
            return cls(rater, "thumbs", event_id, t.completion_id, "", "", _THUMB_FROM_PB.get(t.value), None, None,
                       None, comment, tags)  # fmt: skip
        if kind == "rating":
            r = msg.rating
            return cls(rater, "rating", event_id, r.completion_id, "", "", None, r.score, None, None, comment, tags)
        if kind == "comment":
            return cls(rater, "comment", event_id, msg.comment.completion_id, comment_text=comment, reason_tags=tags)
        if kind == "correction":
            c = msg.correction
            return cls(rater, "correction", event_id, c.completion_id, corrected_text=c.corrected_text,
                       comment_text=comment, reason_tags=tags)  # fmt: skip
        if kind == "pairwise":
            p = msg.pairwise
            return cls(rater, "pairwise", event_id, p.first_completion_id, p.second_completion_id, p.group_id,
                       choice=_CHOICE_FROM_PB.get(p.choice), comment_text=comment, reason_tags=tags)  # fmt: skip
        # Refused by validate(), where it is counted.
        return cls(rater, cast(Kind, ""), event_id, comment_text=comment, reason_tags=tags)

    def validate(self) -> None:
        """Checks everything that needs no store; raises InvalidFeedback naming the field."""
        if self.kind not in KINDS:
            raise InvalidFeedback("missing_kind", "event has no kind; set one of " + ", ".join(KINDS))
        if not self.rater_id.strip():
            raise InvalidFeedback("missing_rater", "rater_id is empty; say who gave the feedback")
        if len(self.rater_id.encode()) > MAX_RATER_BYTES:
            raise InvalidFeedback("rater_too_long", f"rater_id is longer than {MAX_RATER_BYTES} bytes")
        if self.event_id and not EVENT_ID_RE.fullmatch(self.event_id):
            raise InvalidFeedback(
                "bad_event_id", "event_id must be 1-128 printable ASCII characters without spaces, or empty"
            )
        if len(self.comment_text.encode()) > MAX_COMMENT_BYTES:
            raise InvalidFeedback(
                "comment_too_long",
                f"comment_text is {len(self.comment_text.encode())} bytes; the limit is {MAX_COMMENT_BYTES}",
            )
        _check_tags(self.reason_tags)
        if self.kind == "pairwise":
            self._validate_pairwise()
            return
        if not self.completion_id:
            raise InvalidFeedback("missing_completion_id", f"{self.kind}.completion_id is empty")
        if self.kind == "thumbs" and self.thumb_up is None:
            raise InvalidFeedback("missing_thumb", "thumbs.value is unset; send THUMB_UP or THUMB_DOWN")
        if self.kind == "rating" and not (self.rating is not None and 1 <= self.rating <= 5):
            raise InvalidFeedback("rating_out_of_range", f"rating.score must be between 1 and 5, got {self.rating}")
        if self.kind == "comment" and not self.comment_text.strip():
            raise InvalidFeedback("empty_comment", "a comment event needs a non-blank comment_text")
        if self.kind == "correction":
            text = self.corrected_text or ""
            if not text.strip():
                raise InvalidFeedback("empty_correction", "correction.corrected_text is empty; send the wanted text")
            if len(text.encode()) > MAX_CORRECTION_BYTES:
                raise InvalidFeedback(
                    "correction_too_long", f"correction.corrected_text is longer than {MAX_CORRECTION_BYTES} bytes"
                )

    def _validate_pairwise(self) -> None:
        by_ids = bool(self.completion_id or self.second_completion_id)
        if self.group_id and by_ids:
            raise InvalidFeedback(
                "bad_pairwise_target", "pairwise: set either group_id or both completion ids, not both"
            )
        if not self.group_id and not (self.completion_id and self.second_completion_id):
            raise InvalidFeedback(
                "bad_pairwise_target",
                "pairwise: set both first_completion_id and second_completion_id (or group_id of an n=2 request)",
            )
        if by_ids and self.completion_id == self.second_completion_id:
            raise InvalidFeedback("same_completion", "pairwise: the two completion ids are the same completion")
        if self.choice is None:
            raise InvalidFeedback("missing_choice", "pairwise.choice is unset; send FIRST, SECOND or TIE")

    @property
    def content_sha256(self) -> str:
        """Hash of everything but the event id: tells a retry (same content) from a reused id."""
        if not self._content_sha256:
            # A tuple encodes as the same JSON array a list does.
            fields = (
                self.rater_id, self.kind, self.completion_id, self.second_completion_id, self.group_id, self.thumb_up,
                self.rating, self.choice, self.corrected_text, self.comment_text, self.reason_tags,
            )  # fmt: skip
            self._content_sha256 = hashlib.sha256(_json(fields).encode()).hexdigest()
        return self._content_sha256

    @property
    def judgement_key(self) -> str | None:
        """For thumbs and ratings, what a newer event must share to supersede this one: the kind,
        the rater and the completion (unique among current rows in the store). None otherwise."""
        if self.kind not in SUPERSEDING_KINDS:
            return None
        if not self._judgement_key:
            self._judgement_key = _json([self.kind, self.completion_id, self.rater_id])
        return self._judgement_key

    @property
    def value_label(self) -> str:
        """The `value` label of the events metric: up/down, 1-5, first/second/tie, or text."""
        if self.kind == "thumbs":
            return "up" if self.thumb_up else "down"
        if self.kind == "rating":
            return str(self.rating)
        if self.kind == "pairwise":
            return str(self.choice)
        return "text"


def _check_tags(tags: Sequence[str]) -> None:
    if len(tags) > MAX_REASON_TAGS:
        raise InvalidFeedback("bad_reason_tags", f"at most {MAX_REASON_TAGS} reason_tags, got {len(tags)}")
    for t in tags:
        if not t.strip() or len(t.encode()) > MAX_REASON_TAG_BYTES:
            raise InvalidFeedback(
                "bad_reason_tags", f"each reason tag must be 1-{MAX_REASON_TAG_BYTES} bytes and not blank, got {t!r}"
            )


@dataclass(frozen=True)
class FeedbackBatch:
    """The events of one SubmitFeedbackBatch, in the order sent (each validated when submitted)."""

    events: tuple[FeedbackEvent, ...]

    @classmethod
    def from_pb(cls, msg: fpb.SubmitFeedbackBatchRequest) -> FeedbackBatch:
        # Counted before any event is converted: a 4 MiB request can hold two million empty events.
        check_batch_size(len(msg.events))
        return cls(tuple(map(FeedbackEvent.from_pb, msg.events)))


@dataclass(slots=True)
class FeedbackAck:
    event_id: str
    duplicate: bool
    sequence: int
    superseded_event_id: str = ""

    def to_pb(
        self, stream_index: int = 0, into: RepeatedCompositeFieldContainer[fpb.FeedbackAck] | None = None
    ) -> fpb.FeedbackAck:
        """The wire message; `into` builds it in place at the end of a repeated field (a batch
        response), which costs half of building one and copying it there."""
        make = fpb.FeedbackAck if into is None else into.add
        return make(
            event_id=self.event_id,
            duplicate=self.duplicate,
            sequence=self.sequence,
            superseded_event_id=self.superseded_event_id,
            stream_index=stream_index,
        )


@dataclass(slots=True)
class FeedbackRecord:
    """A stored event: the event as sent plus what the server resolved and linked."""

    seq: int  # 0 until inserted
    event: FeedbackEvent
    completion_id: str  # resolved judged completion (pairwise: the first)
    second_completion_id: str | None  # resolved second completion of a pairwise choice
    prompt_sha256: str
    created_at: float
    supersedes: str | None = None
    superseded_by: str | None = None
    txid: int = 0  # the writing transaction on PostgreSQL (0 on SQLite); see `cursor`

    @property
    def cursor(self) -> tuple[int, int]:
        """Where an incremental reader resumes after this row (`Store.feedback_since`)."""
        return (self.txid, self.seq)

    @property
    def kind(self) -> Kind:
        return self.event.kind

    @property
    def event_id(self) -> str:
        return self.event.event_id

    @property
    def is_current(self) -> bool:
        """False once a newer thumbs/rating of the same rater on the same completion replaced it."""
        return self.superseded_by is None
