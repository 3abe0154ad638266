"""Feedback on served completions: the domain types, their validation, and the ingestion service.

An event is accepted exactly once per event id and acknowledged only after it is committed. The
`FeedbackService` runs a group-commit writer thread: every event queued while one transaction
commits goes into the next one, so the cost of a durable commit is shared by all concurrent
callers (a unary call from each of 32 clients, or a whole bulk stream window).

Rules applied here, against the store:
- the same event id with the same content is a no-op that succeeds (`duplicate=True`); with other
  content it is ALREADY_EXISTS;
- a later thumbs (or rating) by the same rater on the same completion supersedes the earlier one for
  training; both rows stay, linked by `supersedes` / `superseded_by`;
- a pairwise choice needs two completions of the same rendered prompt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal, cast

from sqlalchemy.exc import DBAPIError

from tuneloop.v1 import feedback_pb2 as fpb

from .domain import new_id
from .errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, TuneloopError, Unavailable
from .metrics import Metrics
from .store.batching import BatchThread, backoff_delays

if TYPE_CHECKING:
    from .store.base import CompletionRef, Store, StoredEventKey
    from .store.completion_log import CompletionLog

log = logging.getLogger(__name__)

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
EVENT_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces

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


# --- domain types ---


@dataclass(frozen=True)
class FeedbackEvent:
    """One event as sent. Exactly the fields of its `kind` are set (from_pb guarantees it)."""

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

    @classmethod
    def from_pb(cls, msg: fpb.FeedbackEvent) -> FeedbackEvent:
        kind = msg.WhichOneof("kind")
        common = dict(
            event_id=msg.event_id,
            rater_id=msg.rater_id,
            comment_text=msg.comment_text,
            reason_tags=tuple(msg.reason_tags),
        )
        if kind == "thumbs":
            return cls(
                kind="thumbs",
                completion_id=msg.thumbs.completion_id,
                thumb_up=_THUMB_FROM_PB.get(msg.thumbs.value),
                **common,
            )
        if kind == "rating":
            return cls(kind="rating", completion_id=msg.rating.completion_id, rating=msg.rating.score, **common)
        if kind == "comment":
            return cls(kind="comment", completion_id=msg.comment.completion_id, **common)
        if kind == "correction":
            c = msg.correction
            return cls(kind="correction", completion_id=c.completion_id, corrected_text=c.corrected_text, **common)
        if kind == "pairwise":
            p = msg.pairwise
            return cls(
                kind="pairwise",
                completion_id=p.first_completion_id,
                second_completion_id=p.second_completion_id,
                group_id=p.group_id,
                choice=_CHOICE_FROM_PB.get(p.choice),
                **common,
            )
        return cls(kind=cast(Kind, ""), **common)  # refused by validate(), where it is counted

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

    @cached_property
    def content_sha256(self) -> str:
        """Hash of everything but the event id: tells a retry (same content) from a reused id."""
        fields = [
            self.rater_id, self.kind, self.completion_id, self.second_completion_id, self.group_id,
            self.thumb_up, self.rating, self.choice, self.corrected_text, self.comment_text, list(self.reason_tags),
        ]  # fmt: skip
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()

    @cached_property
    def judgement_key(self) -> str | None:
        """For thumbs and ratings, what a newer event must share to supersede this one: the kind,
        the rater and the completion (unique among current rows in the store). None otherwise."""
        if self.kind not in SUPERSEDING_KINDS:
            return None
        return json.dumps([self.kind, self.completion_id, self.rater_id], ensure_ascii=False)

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
class FeedbackAck:
    event_id: str
    duplicate: bool
    sequence: int
    superseded_event_id: str = ""

    def to_pb(self, stream_index: int = 0) -> fpb.FeedbackAck:
        return fpb.FeedbackAck(
            event_id=self.event_id,
            duplicate=self.duplicate,
            sequence=self.sequence,
            superseded_event_id=self.superseded_event_id,
            stream_index=stream_index,
        )


@dataclass(frozen=True)
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


def resolve_targets(
    event: FeedbackEvent,
    refs: Mapping[str, CompletionRef],
    groups: Mapping[str, Sequence[CompletionRef]],
) -> tuple[CompletionRef, CompletionRef | None]:
    """The completion(s) an event is about, checked against the store's rows.

    Raises UnknownCompletion for an id or group the store does not hold, InvalidFeedback for a
    pairwise choice over a group of more than two or over completions of different prompts.
    """
    if event.kind != "pairwise":
        return _known(refs, event.completion_id, "completion_id"), None
    if event.group_id:
        members = groups.get(event.group_id)
        if not members:
            raise UnknownCompletion(f"pairwise.group_id {event.group_id!r} is not a known group of completions")
        if len(members) != 2:
            raise InvalidFeedback(
                "group_not_pair",
                f"pairwise.group_id {event.group_id!r} has {len(members)} candidates; name the two compared "
                "completions with first_completion_id and second_completion_id",
            )
        return members[0], members[1]
    first = _known(refs, event.completion_id, "pairwise.first_completion_id")
    second = _known(refs, event.second_completion_id, "pairwise.second_completion_id")
    if first.prompt_sha256 != second.prompt_sha256:
        raise InvalidFeedback(
            "different_prompts",
            f"pairwise: completions {first.completion_id!r} and {second.completion_id!r} answer different "
            "prompts; a pairwise choice compares two answers to the same prompt",
        )
    return first, second


def _known(refs: Mapping[str, CompletionRef], completion_id: str, field_name: str) -> CompletionRef:
    ref = refs.get(completion_id)
    if ref is None:
        raise UnknownCompletion(f"{field_name} {completion_id!r} is not a known completion")
    return ref


# --- the ingestion service ---


@dataclass(frozen=True)
class FeedbackServiceConfig:
    max_batch: int = 1024  # events per transaction at most
    max_backlog: int = 50_000  # queued events beyond which submissions get RESOURCE_EXHAUSTED
    commit_retry_s: float = 10.0  # how long a failing commit is retried before callers get UNAVAILABLE
    completion_log_wait_s: float = 5.0  # longest wait for just-served completions to reach the store

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_backlog < self.max_batch:
            raise ValueError("need max_batch >= 1 and max_backlog >= max_batch")


@dataclass(frozen=True)
class _Job:
    event: FeedbackEvent
    future: asyncio.Future[FeedbackAck]
    loop: asyncio.AbstractEventLoop


_Outcome = tuple[int, bool] | FeedbackAck | TuneloopError  # (index into new records, duplicate) | ...


@dataclass
class BatchPlan:
    """What each event of one batch does, decided from what the store holds (no I/O here).

    Events are taken in arrival order, so within a batch a retry of an earlier event is a duplicate
    and a newer thumbs supersedes an older one exactly as if they had come in separate batches.
    """

    refs: Mapping[str, CompletionRef]
    groups: Mapping[str, Sequence[CompletionRef]]
    stored: Mapping[str, StoredEventKey]
    current: dict[str, str]  # judgement key -> current event id, updated as events supersede
    now: float
    records: list[FeedbackRecord] = field(default_factory=list)
    targets: list[tuple[CompletionRef, CompletionRef | None]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (older stored, newer) event ids
    outcomes: list[_Outcome] = field(default_factory=list)
    _new_ids: dict[str, int] = field(default_factory=dict)

    def add(self, event: FeedbackEvent) -> None:
        try:
            self.outcomes.append(self._decide(event))
        except TuneloopError as exc:
            self.outcomes.append(exc)

    def _decide(self, event: FeedbackEvent) -> _Outcome:
        content = event.content_sha256
        if (old := self.stored.get(event.event_id)) is not None:
            _check_same_content(event.event_id, old.content_sha256, content)
            return FeedbackAck(event.event_id, True, old.seq, old.supersedes or "")
        if (i := self._new_ids.get(event.event_id)) is not None:
            _check_same_content(event.event_id, self.records[i].event.content_sha256, content)
            return (i, True)
        first, second = resolve_targets(event, self.refs, self.groups)
        supersedes = None
        if (key := event.judgement_key) is not None:
            supersedes = self.current.get(key)
            self.current[key] = event.event_id
            if supersedes in self._new_ids:  # superseded within this batch: insert it already linked
                j = self._new_ids[supersedes]
                self.records[j] = replace(self.records[j], superseded_by=event.event_id)
            elif supersedes is not None:
                self.links.append((supersedes, event.event_id))
        self._new_ids[event.event_id] = len(self.records)
        self.records.append(
            FeedbackRecord(
                seq=0,
                event=event,
                completion_id=first.completion_id,
                second_completion_id=second.completion_id if second else None,
                prompt_sha256=first.prompt_sha256,
                created_at=self.now,
                supersedes=supersedes,
            )
        )
        self.targets.append((first, second))
        return (len(self.records) - 1, False)

    def acks(self, seqs: Sequence[int]) -> list[FeedbackAck | TuneloopError]:
        """The answer to each event, once the new records got their sequence numbers."""
        out: list[FeedbackAck | TuneloopError] = []
        for o in self.outcomes:
            if isinstance(o, tuple):
                rec = self.records[o[0]]
                out.append(FeedbackAck(rec.event.event_id, o[1], seqs[o[0]], rec.supersedes or ""))
            else:
                out.append(o)
        return out


def _check_same_content(event_id: str, stored_sha: str, sent_sha: str) -> None:
    if stored_sha != sent_sha:
        raise EventIdConflict(
            f"event_id {event_id!r} was already used for a different event; use a new id for new feedback"
        )


class FeedbackService:
    """Validates feedback, applies exactly-once and supersede rules, and group-commits it.

    `submit`/`enqueue` run on the event loop and only validate and queue; the writer thread does
    every store read and write, one transaction per batch, and resolves each caller's future after
    the commit. Call `start()` before submitting and `await close()` on shutdown (it commits and
    acknowledges everything queued).
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        completion_log: CompletionLog | None = None,
        config: FeedbackServiceConfig = FeedbackServiceConfig(),
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._completion_log = completion_log
        self._config = config
        self._writer: BatchThread[_Job] | None = None
        self._backlog = 0
        self._backlog_lock = threading.Lock()

    def start(self) -> None:
        if self._writer is None:
            self._writer = BatchThread("feedback-writer", self._commit_batch, max_batch=self._config.max_batch)

    async def close(self, timeout: float = 30.0) -> bool:
        """Stops accepting events and waits (off the loop) until the queued ones are committed."""
        if self._writer is None:
            return True
        return await asyncio.to_thread(self._writer.close, timeout)

    async def submit(self, event: FeedbackEvent) -> FeedbackAck:
        """Stores one event; returns after it is committed. Raises the domain errors."""
        return await self.enqueue(event)

    def enqueue(self, event: FeedbackEvent) -> asyncio.Future[FeedbackAck]:
        """Validates and queues one event without waiting; the future resolves after the commit.
        Static validation errors are raised here, store-dependent ones through the future."""
        try:
            event.validate()
            if not event.event_id:
                event = replace(event, event_id=new_id("fb"))
            loop = asyncio.get_running_loop()
            job = _Job(event, loop.create_future(), loop)
            self._queue(job)
        except TuneloopError as exc:
            self._metrics.feedback_rejected.labels(rejection_reason(exc)).inc()
            raise
        return job.future

    def _queue(self, job: _Job) -> None:
        with self._backlog_lock:
            if self._backlog >= self._config.max_backlog:
                raise FeedbackBacklog(f"{self._backlog} feedback events are waiting to be stored; retry shortly")
            self._backlog += 1
        try:
            if self._writer is None:
                raise RuntimeError("not started")
            self._writer.put_many([job])
        except RuntimeError:  # not started, or closed
            with self._backlog_lock:
                self._backlog -= 1
            raise StoreUnavailable("the feedback service is not running (starting or shutting down)") from None

    # --- writer thread ---

    def _commit_batch(self, jobs: list[_Job]) -> None:
        events = [j.event for j in jobs]
        self._wait_for_completion_log(events)
        results: list[FeedbackAck | BaseException]
        try:
            results = list(self._commit_with_retry(events))
        except Exception as exc:  # a bug: every caller gets INTERNAL instead of waiting forever
            log.exception("feedback: unexpected error committing %d events", len(events))
            results = [exc] * len(events)
        for res in results:
            if isinstance(res, BaseException):
                self._metrics.feedback_rejected.labels(rejection_reason(res)).inc()
        with self._backlog_lock:
            self._backlog -= len(jobs)
        _deliver(jobs, results)

    def _wait_for_completion_log(self, events: Sequence[FeedbackEvent]) -> None:
        if self._completion_log is None:
            return
        keys = {k for e in events for k in (e.completion_id, e.second_completion_id, e.group_id) if k}
        if self._completion_log.has_pending(keys):
            self._completion_log.flush(self._config.completion_log_wait_s)

    def _commit_with_retry(self, events: Sequence[FeedbackEvent]) -> list[FeedbackAck | TuneloopError]:
        """Commits the batch, retrying the whole transaction on a database error (locked file, I/O
        error, a concurrent writer's unique-key race) until `commit_retry_s` has passed."""
        deadline = time.monotonic() + self._config.commit_retry_s
        delays = backoff_delays()
        while True:
            try:
                plan, seqs = self._plan_and_write(events)
            except DBAPIError as exc:
                if time.monotonic() >= deadline:
                    log.error("feedback: giving up on %d events after failed commits: %s", len(events), exc)
                    cause = type(exc.orig).__name__
                    message = f"the feedback store is failing ({cause}); retry with the same event ids"
                    return [StoreUnavailable(message) for _ in events]
                delay = next(delays)
                log.warning("feedback: commit of %d events failed (%s); retrying in %.2fs", len(events), exc, delay)
                time.sleep(delay)
                continue
            self._count_accepted(plan)
            return plan.acks(seqs)

    def _plan_and_write(self, events: Sequence[FeedbackEvent]) -> tuple[BatchPlan, list[int]]:
        """One transaction: read what the batch refers to, decide, insert, link supersedes."""
        with self._store.feedback_transaction() as tx:
            completion_ids = {c for e in events for c in (e.completion_id, e.second_completion_id) if c}
            plan = BatchPlan(
                refs=tx.completion_refs(completion_ids),
                groups=tx.group_refs({e.group_id for e in events if e.group_id}),
                stored=tx.stored_events({e.event_id for e in events}),
                current=tx.current_judgements({k for e in events if (k := e.judgement_key) is not None}),
                now=time.time(),
            )
            for e in events:
                plan.add(e)
            tx.mark_superseded(plan.links)  # first: at most one current row per judgement key
            seqs = tx.insert_feedback(plan.records)
        return plan, seqs

    def _count_accepted(self, plan: BatchPlan) -> None:
        """Adds the batch's new events to the metrics, one increment per label set."""
        m = self._metrics
        tally: Counter[tuple[object, tuple[str, ...]]] = Counter()
        for rec, (first, second) in zip(plan.records, plan.targets, strict=True):
            e = rec.event
            tally[m.feedback_events, (e.kind, e.value_label)] += 1
            adapter = (first.adapter_name, first.adapter_version)
            if e.kind == "thumbs":
                tally[m.thumbs_up if e.thumb_up else m.thumbs_down, adapter] += 1
            elif e.kind == "rating" and e.rating is not None:
                tally[m.rating_sum, adapter] += e.rating
                tally[m.rating_count, adapter] += 1
            elif e.kind == "pairwise" and second is not None and e.choice != "tie":
                winner, loser = (first, second) if e.choice == "first" else (second, first)
                tally[m.pairwise_wins, (winner.adapter_name, winner.adapter_version)] += 1
                tally[m.pairwise_losses, (loser.adapter_name, loser.adapter_version)] += 1
        for (counter, labels), amount in tally.items():
            counter.labels(*labels).inc(amount)  # type: ignore[attr-defined]


def _deliver(jobs: Sequence[_Job], results: Sequence[FeedbackAck | BaseException]) -> None:
    """Resolves the callers' futures on their loops: one thread-safe callback per loop and batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[FeedbackAck], object]]] = defaultdict(list)
    for job, res in zip(jobs, results, strict=True):
        by_loop[job.loop].append((job.future, res))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody is waiting for these answers any more
            pass


def _resolve(items: Sequence[tuple[asyncio.Future[FeedbackAck], object]]) -> None:
    for fut, res in items:
        if fut.done():  # the caller went away (cancelled); the event is stored all the same
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)  # type: ignore[arg-type]
