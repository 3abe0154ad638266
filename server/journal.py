"""A spill file on local disk for records the store cannot take right now, replayed in order.

While the store is unreachable the completion log appends each batch here instead of holding it
in memory, so memory stays bounded however long the outage lasts; when the store answers again
the journal is replayed oldest first and each replayed chunk is committed to the store before the
journal's read position moves past it. A crash between the two replays that chunk again, which
the store's insert-if-absent makes harmless: every record lands exactly once.

Layout, in one directory per store: `records.jsonl` (one JSON object per line, appended and
fsynced per batch), `offset` (the byte position of the first record not yet in the store,
replaced atomically), `lock` (flock: one process per journal). The directory is created on the
first spill, and both files are removed when a replay catches up.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class JournalLocked(RuntimeError):
    """Another process holds this journal."""


class Journal(Generic[T]):
    def __init__(self, directory: Path, encode: Callable[[T], dict[str, Any]], decode: Callable[[dict[str, Any]], T]):
        self.directory = directory
        self._encode, self._decode = encode, decode
        self._data = directory / "records.jsonl"
        self._offset_file = directory / "offset"
        self._lock_fd: int | None = None
        self._fh: Any = None
        self._offset = 0  # byte position of the first record not yet in the store
        self.backlog = 0  # records on disk not yet in the store
        if self._data.exists():
            self._open()
            self._offset = self._read_offset()
            with self._data.open("rb") as f:
                f.seek(self._offset)
                self.backlog = sum(1 for line in f if line.endswith(b"\n"))

    def _open(self) -> None:
        if self._fh is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise JournalLocked(
                f"the completion journal {self.directory} is in use by another process; give each server "
                "its own --journal-dir"
            ) from exc
        self._lock_fd = fd
        self._fh = self._data.open("ab")

    def _read_offset(self) -> int:
        try:
            return int(self._offset_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def append(self, records: Sequence[T]) -> None:
        """Appends records, durable on return (written and fsynced)."""
        self._open()
        payload = b"".join(
            json.dumps(self._encode(r), separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for r in records
        )
        self._fh.write(payload)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.backlog += len(records)

    def read(self, max_records: int) -> tuple[list[T], int]:
        """The oldest records not yet in the store (at most `max_records`), and the position just
        past them to `commit` once the store has them. A half-written last line is not returned."""
        if self.backlog == 0:
            return [], self._offset
        out: list[T] = []
        pos = self._offset
        with self._data.open("rb") as f:
            f.seek(pos)
            for line in f:
                if len(out) >= max_records or not line.endswith(b"\n"):
                    break
                out.append(self._decode(json.loads(line)))
                pos += len(line)
        return out, pos

    def commit(self, position: int, count: int) -> None:
        """The store has the `count` records before `position`: move the read position past them.
        When that empties the journal its files are removed."""
        self.backlog = max(0, self.backlog - count)
        self._offset = position
        if self.backlog == 0:
            self._reset()
            return
        tmp = self._offset_file.with_suffix(".tmp")
        tmp.write_text(str(position))
        os.replace(tmp, self._offset_file)

    def _reset(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._offset = 0
        self._offset_file.unlink(missing_ok=True)
        self._data.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Releases the file and the lock; records still on disk stay for the next process."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
