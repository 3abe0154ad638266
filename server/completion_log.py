"""Writes served completions to the store from a background thread, in batches.

`submit` is called on the asyncio event loop when a request finishes: it only appends to a queue,
so the loop never waits for disk. The writer thread commits each batch in one transaction.

When a write fails (the store is down or unreachable) the log spills: that batch and every one
after it go to a journal on local disk (`journal.py`) instead of memory, so serving goes on with
memory bounded, and a replay thread writes the journal to the store, oldest first, with backoff
until it answers; once the journal is empty, batches go straight to the store again. Order is
kept (nothing bypasses the journal while it holds records) and every record lands once. Records
still in the journal when the server stops are replayed by the next one. Without a journal
directory a failed batch is retried in memory instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path

from .batching import BatchThread, backoff_delays
from .domain import CompletionRecord
from .journal import Journal, JournalLocked
from .metrics import Metrics
from .store.base import Store

log = logging.getLogger(__name__)


class CompletionLog:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        max_batch: int = 512,
        flush_interval_s: float = 0.05,
        journal_dir: Path | None = None,
    ) -> None:
        """`flush_interval_s`: how long a batch stays open after its first record, so light
        traffic still makes few transactions; a full batch (`max_batch`) is written at once.
        `journal_dir`: where batches spill while the store is unreachable (None: retry in memory)."""
        self._store = store
        self._metrics = metrics
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._submitted = 0  # records accepted by submit() (and found in the journal at start)
        self._done = 0  # records committed (or abandoned by close)
        self._pending_keys: Counter[str] = Counter()  # completion and group ids queued in memory
        # completion id -> (loop, future) of callers waiting for that record to be on disk
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]]] = {}
        self._abandon = threading.Event()
        self._closing = threading.Event()
        self._spill_lock = threading.Lock()  # orders appends, replay commits and leaving spill mode
        self._journal: Journal[CompletionRecord] | None = None
        self._spilling = False
        self._spill_started = 0.0
        self._wake = threading.Event()
        self._replayer: threading.Thread | None = None
        if journal_dir is not None:
            self._journal = Journal(journal_dir, asdict, lambda d: CompletionRecord(**d))
            if self._journal.backlog:
                log.warning(
                    "completion log: %d records from an earlier run are in the journal %s; writing them to the store",
                    self._journal.backlog,
                    journal_dir,
                )
                self._submitted += self._journal.backlog
                metrics.log_journal_records.set(self._journal.backlog)
                self._enter_spill()
        self._writer: BatchThread[CompletionRecord] = BatchThread(
            "completion-log-writer", self._write_batch, max_batch=max_batch, linger_s=flush_interval_s
        )

    @property
    def spilling(self) -> bool:
        """Whether records are going to the journal (the store failed and the journal is not empty)."""
        return self._spilling

    def submit(self, records: Sequence[CompletionRecord]) -> None:
        """Queues records for writing. Never blocks, never does I/O; safe from any thread.
        Raises RuntimeError after close()."""
        if not records:
            return
        with self._cond:
            self._writer.put_many(records)
            self._submitted += len(records)
            for r in records:
                self._pending_keys[r.completion_id] += 1
                if r.group_id:
                    self._pending_keys[r.group_id] += 1
        self._metrics.log_queue_depth.inc(len(records))

    def has_pending(self, keys: Collection[str]) -> bool:
        """Whether any of these completion or group ids may be submitted but not yet committed.

        Feedback can arrive a few milliseconds after its completion was served; the feedback
        service calls `flush` first in that case instead of answering NOT_FOUND. While the journal
        holds records any id may be among them (the journal keeps no index in memory).
        """
        with self._cond:
            return self._spilling or any(k in self._pending_keys for k in keys)

    async def durable(self, completion_id: str, timeout: float) -> bool:
        """Waits (on the event loop, no thread) until the record of `completion_id`, already
        submitted, is on disk: committed to the store, or in the journal while the store is down.
        False if that did not happen within `timeout` seconds or the record was given up."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        with self._cond:
            if completion_id not in self._pending_keys:
                return True  # written already
            self._waiters.setdefault(completion_id, []).append((loop, fut))
        self._writer.cut_batch()  # a caller waits: do not linger
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._cond:
                left = [w for w in self._waiters.get(completion_id, []) if w[1] is not fut]
                if left:
                    self._waiters[completion_id] = left
                else:
                    self._waiters.pop(completion_id, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every record submitted before this call is committed. False on timeout."""
        with self._cond:
            target = self._submitted
            if self._done >= target:
                return True
        self._writer.cut_batch()
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stops accepting records, writes everything queued, stops the threads. If the store
        still refuses writes after `timeout` seconds: with a journal, what it holds stays on disk
        for the next start; without one, retrying stops and the log says how many records are lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = self._writer.close(timeout)
        if ok and self._replayer is not None:
            with self._cond:
                ok = self._cond.wait_for(lambda: not self._spilling, _remaining(deadline))
        self._closing.set()
        self._wake.set()
        if not ok:
            self._abandon.set()
            self._writer.close(5.0)
        if self._replayer is not None:
            self._replayer.join(5.0)
        if self._journal is not None:
            if self._journal.backlog:
                log.warning(
                    "completion log: the store is still failing; %d records stay in the journal %s and are written "
                    "when the server next starts",
                    self._journal.backlog,
                    self._journal.directory,
                )
            self._journal.close()
        return ok

    # -- the writer thread -------------------------------------------------------------------
    def _write_batch(self, batch: list[CompletionRecord]) -> None:
        if self._spill(batch, only_if_spilling=True):
            return
        delays = backoff_delays()
        while True:
            t0 = time.perf_counter()
            try:
                self._store.write_completions(batch)
            except Exception as exc:
                self._metrics.log_write_errors.inc()
                if self._abandon.is_set():
                    log.error("completion log closed with the store failing: %d records NOT written", len(batch))
                    self._committed(batch, written=False)
                    return
                if self._spill(batch, only_if_spilling=False, reason=exc):
                    return
                delay = next(delays)
                log.warning("completion log: writing %d records failed (%s); retrying in %.2fs", len(batch), exc, delay)
                self._abandon.wait(delay)
                continue
            self._metrics.log_batch_seconds.observe(time.perf_counter() - t0)
            self._committed(batch)
            return

    def _spill(self, batch: list[CompletionRecord], *, only_if_spilling: bool, reason: object = None) -> bool:
        """Appends `batch` to the journal: always once the log spills, and on a failed write when
        there is a journal. False when the batch must go to the store instead (or be retried)."""
        if self._journal is None:
            return False
        with self._spill_lock:
            if only_if_spilling and not self._spilling:
                return False
            try:
                self._journal.append(batch)
            except (OSError, JournalLocked) as exc:
                log.error("completion log: cannot spill to the journal (%s); retrying the store in memory", exc)
                return False
            if not self._spilling:
                log.warning(
                    "completion log: the store failed (%s); spilling served completions to the journal %s until it "
                    "answers again",
                    reason,
                    self._journal.directory,
                )
                self._enter_spill()
        self._metrics.log_journal_records.set(self._journal.backlog)
        self._metrics.log_queue_depth.dec(len(batch))
        with self._cond:
            self._forget_keys(batch, durable=True)  # fsynced in the journal: on disk
        self._wake.set()
        return True

    def _enter_spill(self) -> None:
        self._spilling = True
        self._spill_started = time.monotonic()
        if self._replayer is None or not self._replayer.is_alive():
            self._replayer = threading.Thread(target=self._replay, name="completion-log-replay", daemon=True)
            self._replayer.start()

    # -- the replay thread -------------------------------------------------------------------
    def _replay(self) -> None:
        journal = self._journal
        assert journal is not None
        delays = backoff_delays()
        while not self._closing.is_set() or self._spilling:
            if self._abandon.is_set():
                return
            if not self._spilling:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            records, end = journal.read(self._max_batch)
            if not records:
                with self._spill_lock:
                    if journal.backlog == 0:  # nothing was appended since the read: leave spill mode
                        log.info(
                            "completion log: the journal is written to the store after %.1f s; writing directly again",
                            time.monotonic() - self._spill_started,
                        )
                        with self._cond:
                            self._spilling = False
                            self._cond.notify_all()
                        delays = backoff_delays()
                continue
            t0 = time.perf_counter()
            try:
                self._store.write_completions(records)
            except Exception as exc:
                self._metrics.log_write_errors.inc()
                delay = next(delays)
                log.debug("completion log: replaying the journal failed (%s); retrying in %.2fs", exc, delay)
                self._abandon.wait(delay)
                continue
            self._metrics.log_batch_seconds.observe(time.perf_counter() - t0)
            with self._spill_lock:
                journal.commit(end, len(records))
                self._metrics.log_journal_records.set(journal.backlog)
            self._committed(records, in_memory=False)
            delays = backoff_delays()

    # -- bookkeeping -------------------------------------------------------------------------
    def _committed(self, batch: list[CompletionRecord], *, written: bool = True, in_memory: bool = True) -> None:
        """`batch` is in the store (or given up): count it done and wake `flush` waiters."""
        if written:
            self._metrics.log_written.inc(len(batch))
            committed = time.time()
            for r in batch:  # served -> committed: how long a crash could lose it
                self._metrics.log_lag.observe(max(0.0, committed - r.created_at))
        if in_memory:
            self._metrics.log_queue_depth.dec(len(batch))
        with self._cond:
            self._done += len(batch)
            if in_memory:
                self._forget_keys(batch, durable=written)
            self._cond.notify_all()

    def _forget_keys(self, batch: list[CompletionRecord], *, durable: bool) -> None:
        """Called with `_cond` held: the batch left memory (on disk when `durable`, else given up)."""
        for r in batch:
            for loop, fut in self._waiters.pop(r.completion_id, ()):
                loop.call_soon_threadsafe(_resolve, fut, durable)
        for r in batch:
            for key in (r.completion_id, r.group_id):
                if key:
                    self._pending_keys[key] -= 1
                    if self._pending_keys[key] <= 0:
                        del self._pending_keys[key]


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
