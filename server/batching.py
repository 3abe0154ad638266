"""A writer thread that hands queued items to a handler in batches: the core of group commit.

Callers on the asyncio event loop only append to a queue (no I/O, no blocking); the thread takes
everything queued so far, up to `max_batch`, and commits it in one transaction. While one batch
commits, the next one fills, so the per-commit cost (an fsync) is shared by every waiting caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()  # handle what is queued, then end the thread
_CUT = object()  # end the current batch now instead of lingering


def backoff_delays(initial_s: float = 0.05, factor: float = 2.0, max_s: float = 2.0) -> Iterator[float]:
    """Exponential retry delays: initial_s, initial_s*factor, ... capped at max_s, forever."""
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * factor, max_s)


class BatchThread(Generic[T]):
    """Runs `handle(batch)` on a daemon thread for each batch of queued items, in FIFO order.

    `linger_s` > 0 keeps a batch open that long after its first item (fewer, larger transactions
    under light load); 0 takes only what is already queued (lowest latency). `handle` must deal
    with its own errors; an exception escaping it is logged and the items are counted as handled.

    `weight` (default: 1 per item) lets one item stand for many, e.g. a caller's whole batch of
    rows: a batch then holds items up to `max_batch` in total weight, and an item is never split,
    so one that weighs `max_batch` or more is a batch of its own.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        max_batch: int,
        linger_s: float = 0.0,
        weight: Callable[[T], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._handle = handle
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._weight = weight
        self._carry: list[T] = []  # an item that did not fit the last batch: first of the next one
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # makes "closed?" + put atomic with respect to close()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def put_many(self, items: Iterable[T]) -> None:
        """Queues items without blocking. Raises RuntimeError after close()."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._thread.name} is closed")
            for item in items:
                self._queue.put(item)

    def cut_batch(self) -> None:
        """Ends the batch being gathered without waiting out `linger_s` (for a caller who waits)."""
        self._queue.put(_CUT)

    def close(self, timeout: float | None = None) -> bool:
        """Stops accepting items, lets the thread handle everything queued, and waits for it.
        Returns False if the thread is still busy after `timeout` seconds."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        stop = False
        weight = self._weight or (lambda _item: 1)
        while not stop:
            first = self._carry.pop() if self._carry else self._queue.get()
            if first is _STOP:
                return
            if first is _CUT:
                continue
            batch: list[T] = [first]  # type: ignore[list-item]
            size = weight(first)  # type: ignore[arg-type]
            deadline = time.monotonic() + self._linger_s
            while size < self._max_batch:
                try:
                    remaining = deadline - time.monotonic()
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if item is _CUT:
                    break
                w = weight(item)  # type: ignore[arg-type]
                if size + w > self._max_batch:
                    self._carry.append(item)  # type: ignore[arg-type]
                    break
                batch.append(item)  # type: ignore[arg-type]
                size += w
            try:
                self._handle(batch)
            except Exception:  # a bug in the handler must not kill the writer thread
                log.exception("%s: unhandled error in batch handler (%d items)", self._thread.name, len(batch))
