"""The feedback ingestion service.

An event is accepted exactly once per event id and acknowledged only after it is committed. The
`FeedbackService` runs a group-commit writer thread: every event queued while one transaction
commits goes into the next one, so the cost of a durable commit is shared by all concurrent
callers (a unary call from each of 32 clients, a whole bulk stream window, or a few batch calls).
A caller's batch (`submit_batch`) is queued as one item, so it is never split across transactions.

Rules applied per batch (in `planning.py`), against the store:
- the same event id with the same content is a no-op that succeeds (`duplicate=True`); with other
  content it is ALREADY_EXISTS;
- a later thumbs (or rating) by the same rater on the same completion supersedes the earlier one for
  training; both rows stay, linked by `supersedes` / `superseded_by`;
- a pairwise choice needs two completions of the same rendered prompt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy.exc import DBAPIError

from ..batching import BatchThread, backoff_delays
from ..completion_log import CompletionLog
from ..domain import new_id
from ..errors import TuneloopError
from ..metrics import Metrics
from ..store.base import Store
from .events import (
    MAX_BATCH_EVENTS,
    FeedbackAck,
    FeedbackBacklog,
    FeedbackEvent,
    StoreUnavailable,
    check_batch_size,
    rejection_reason,
)
from .planning import BatchPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackServiceConfig:
    max_batch: int = 1024  # events per transaction at most (a caller's batch is never split: fits in one)
    max_backlog: int = 50_000  # queued events beyond which submissions get RESOURCE_EXHAUSTED
    commit_retry_s: float = 10.0  # how long a failing commit is retried before callers get UNAVAILABLE
    completion_log_wait_s: float = 5.0  # longest wait for just-served completions to reach the store

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_backlog < max(self.max_batch, MAX_BATCH_EVENTS):
            raise ValueError("need max_batch >= 1 and max_backlog >= max_batch and >= MAX_BATCH_EVENTS")


# What the writer answers for one event: its ack, or why it was refused.
Outcome = FeedbackAck | TuneloopError


@dataclass(frozen=True)
class _Job:
    """One caller's events, answered together: one future per job, not per event, so a batch of a
    thousand costs the event loop one callback."""

    events: list[FeedbackEvent]
    # single: the event's FeedbackAck, or its error raised. Batch: the list of outcomes, in order.
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    single: bool


class FeedbackService:
    """Validates feedback, applies exactly-once and supersede rules, and group-commits it.

    `submit`/`enqueue`/`submit_batch` run on the event loop and only validate and queue; the
    writer thread does every store read and write, one transaction per batch, and resolves each
    caller's future after the commit. Call `start()` before submitting and `await close()` on
    shutdown (it commits and acknowledges everything queued).
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
            self._writer = BatchThread(
                "feedback-writer", self._commit_batch, max_batch=self._config.max_batch, weight=_job_weight
            )

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
            job = _new_job([_with_id(event)], single=True)
            self._queue(job)
        except TuneloopError as exc:
            self._metrics.feedback_rejected.labels(rejection_reason(exc)).inc()
            raise
        return cast("asyncio.Future[FeedbackAck]", job.future)

    async def submit_batch(self, events: Sequence[FeedbackEvent]) -> list[Outcome]:
        """Stores a caller's batch as one unit of the group commit; returns after the commit with one
        outcome per event, in order: its ack, or its own error (invalid, unknown completion, event id
        reused), while the other events are stored all the same. Events are decided in order, as if
        submitted one by one. Raised instead, for the whole batch: InvalidFeedback for more than
        MAX_BATCH_EVENTS events, FeedbackBacklog when the backlog cannot take it, StoreUnavailable
        when the store cannot commit (then nothing of the batch is stored).
        """
        check_batch_size(len(events))
        outcomes: list[Outcome | None] = [None] * len(events)
        accepted: list[FeedbackEvent] = []
        positions: list[int] = []
        for i, event in enumerate(events):
            try:
                event.validate()
            except TuneloopError as exc:
                self._metrics.feedback_rejected.labels(rejection_reason(exc)).inc()
                outcomes[i] = exc
                continue
            accepted.append(_with_id(event))
            positions.append(i)
        if accepted:
            job = _new_job(accepted, single=False)
            try:
                self._queue(job)
            except TuneloopError as exc:
                self._metrics.feedback_rejected.labels(rejection_reason(exc)).inc(len(accepted))
                raise
            results: list[FeedbackAck | BaseException] = await job.future
            for i, res in zip(positions, results, strict=True):
                if isinstance(res, StoreUnavailable) or not isinstance(res, (FeedbackAck, TuneloopError)):
                    raise res  # the transaction failed: the whole batch did, and retrying it is safe
                outcomes[i] = res
        return cast("list[Outcome]", outcomes)

    def _queue(self, job: _Job) -> None:
        n = len(job.events)
        with self._backlog_lock:
            if self._backlog + n > self._config.max_backlog:
                raise FeedbackBacklog(f"{self._backlog} feedback events are waiting to be stored; retry shortly")
            self._backlog += n
        try:
            if self._writer is None:
                raise RuntimeError("not started")
            self._writer.put_many([job])
        except RuntimeError:  # not started, or closed
            with self._backlog_lock:
                self._backlog -= n
            raise StoreUnavailable("the feedback service is not running (starting or shutting down)") from None

    # --- writer thread ---

    def _commit_batch(self, jobs: list[_Job]) -> None:
        events = [e for j in jobs for e in j.events]
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
            self._backlog -= len(events)
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
        """Adds the batch's new events to the metrics, one increment per label set: the events are
        tallied by (kind, value, adapter version) in one pass first (Counter counts in C)."""
        m = self._metrics
        tally = Counter(
            (rec.event.kind, rec.event.value_label, first.adapter_name, first.adapter_version, second)
            for rec, (first, second) in zip(plan.records, plan.targets, strict=True)
        )
        for (kind, value, name, version, second), n in tally.items():
            m.feedback_events.labels(kind, value).inc(n)
            if kind == "thumbs":
                (m.thumbs_up if value == "up" else m.thumbs_down).labels(name, version).inc(n)
            elif kind == "rating":
                m.rating_sum.labels(name, version).inc(int(value) * n)
                m.rating_count.labels(name, version).inc(n)
            elif kind == "pairwise" and second is not None and value != "tie":
                winner, loser = ((name, version), (second.adapter_name, second.adapter_version))
                if value == "second":
                    winner, loser = loser, winner
                m.pairwise_wins.labels(*winner).inc(n)
                m.pairwise_losses.labels(*loser).inc(n)


def _with_id(event: FeedbackEvent) -> FeedbackEvent:
    return event if event.event_id else replace(event, event_id=new_id("fb"))


def _new_job(events: list[FeedbackEvent], single: bool) -> _Job:
    loop = asyncio.get_running_loop()
    return _Job(events, loop.create_future(), loop, single)


def _job_weight(job: _Job) -> int:
    return len(job.events)


def _deliver(jobs: Sequence[_Job], results: Sequence[FeedbackAck | BaseException]) -> None:
    """Resolves the callers' futures on their loops: one thread-safe callback per loop and batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Sequence[object]]]] = defaultdict(list)
    start = 0
    for job in jobs:
        end = start + len(job.events)
        by_loop[job.loop].append((job, results[start:end]))
        start = end
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody is waiting for these answers any more
            pass


def _resolve(items: Sequence[tuple[_Job, Sequence[object]]]) -> None:
    for job, results in items:
        fut = job.future
        if fut.done():  # the caller went away (cancelled); the events are stored all the same
            continue
        if not job.single:
            fut.set_result(list(results))
        elif isinstance(results[0], BaseException):
            fut.set_exception(results[0])
        else:
            fut.set_result(results[0])
