"""Writes served completions to the store from a background thread, in batches.

`submit` is called on the asyncio event loop when a request finishes: it only appends to a queue,
so the loop never waits for disk. The writer thread commits each batch in one transaction and
retries a failed batch with backoff until it commits (records are never dropped silently; only
`close` with an expired timeout gives up, and says how many records it could not write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence

from .batching import BatchThread, backoff_delays
from .domain import CompletionRecord
from .metrics import Metrics
from .store.base import Store

log = logging.getLogger(__name__)


class CompletionLog:
    def __init__(self, store: Store, metrics: Metrics, max_batch: int = 512, flush_interval_s: float = 0.05) -> None:
        """`flush_interval_s`: how long a batch stays open after its first record, so light
        traffic still makes few transactions; a full batch (`max_batch`) is written at once."""
        self._store = store
        self._metrics = metrics
        self._cond = threading.Condition()
        self._submitted = 0  # records accepted by submit()
        self._done = 0  # records committed (or abandoned by close)
        self._pending_keys: Counter[str] = Counter()  # completion and group ids not yet committed
        self._abandon = threading.Event()
        self._writer: BatchThread[CompletionRecord] = BatchThread(
            "completion-log-writer", self._write_batch, max_batch=max_batch, linger_s=flush_interval_s
        )

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
        """Whether any of these completion or group ids is submitted but not yet committed.

        Feedback can arrive a few milliseconds after its completion was served; the feedback
        service calls `flush` first in that case instead of answering NOT_FOUND.
        """
        with self._cond:
            return any(k in self._pending_keys for k in keys)

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
        """Stops accepting records, writes everything queued, stops the thread. If the store still
        refuses writes after `timeout` seconds, stops retrying and logs how many records are lost."""
        if self._writer.close(timeout):
            return True
        self._abandon.set()
        self._writer.close(5.0)
        return False

    def _write_batch(self, batch: list[CompletionRecord]) -> None:
        delays = backoff_delays()
        while True:
            t0 = time.perf_counter()
            try:
                self._store.write_completions(batch)
            except Exception as exc:
                self._metrics.log_write_errors.inc()
                if self._abandon.is_set():
                    log.error("completion log closed with the store failing: %d records NOT written", len(batch))
                    break
                delay = next(delays)
                log.warning("completion log: writing %d records failed (%s); retrying in %.2fs", len(batch), exc, delay)
                self._abandon.wait(delay)
                continue
            self._metrics.log_batch_seconds.observe(time.perf_counter() - t0)
            self._metrics.log_written.inc(len(batch))
            committed = time.time()
            for r in batch:  # served -> committed: how long a crash could lose it
                self._metrics.log_lag.observe(max(0.0, committed - r.created_at))
            break
        self._metrics.log_queue_depth.dec(len(batch))
        with self._cond:
            self._done += len(batch)
            for r in batch:
                for key in (r.completion_id, r.group_id):
                    if key:
                        self._pending_keys[key] -= 1
                        if self._pending_keys[key] <= 0:
                            del self._pending_keys[key]
            self._cond.notify_all()
