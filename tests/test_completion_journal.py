"""The completion journal and the completion log's spill logic: pure file and thread logic, with
an in-memory store that can be made to fail (the outage against a real PostgreSQL server is in
tests/test_store_outage.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import pytest
from completion_factory import make_completion
from prometheus_client import CollectorRegistry

from tuneloop.server.completion_log import CompletionLog
from tuneloop.server.domain import CompletionRecord
from tuneloop.server.journal import Journal, JournalLocked
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import open_store


def journal(path: Path) -> Journal[CompletionRecord]:
    return Journal(path, asdict, lambda d: CompletionRecord(**d))


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_the_journal_replays_in_order_across_reopens_and_removes_itself_when_caught_up(tmp_path: Path) -> None:
    recs = [make_completion(output=f"reply {i}") for i in range(7)]
    j = journal(tmp_path / "j")
    assert not (tmp_path / "j").exists()  # nothing on disk until the first spill
    j.append(recs[:3])
    j.append(recs[3:])
    got, end = j.read(4)
    assert got == recs[:4] and j.backlog == 7
    j.commit(end, len(got))
    j.close()
    j = journal(tmp_path / "j")  # a restart: the read position survived
    assert j.backlog == 3
    got, end = j.read(100)
    assert got == recs[4:]
    j.commit(end, len(got))
    assert j.backlog == 0 and not (tmp_path / "j" / "records.jsonl").exists()
    j.append(recs[:1])  # and it starts over cleanly
    assert j.read(10)[0] == recs[:1]


def test_a_half_written_last_line_is_not_replayed(tmp_path: Path) -> None:
    j = journal(tmp_path / "j")
    j.append([make_completion()])
    j.close()
    with (tmp_path / "j" / "records.jsonl").open("ab") as f:
        f.write(b'{"completion_id": "cut-off by a cra')
    j = journal(tmp_path / "j")
    got, _ = j.read(10)
    assert j.backlog == 1 and len(got) == 1


def test_one_process_per_journal(tmp_path: Path) -> None:
    a = journal(tmp_path / "j")
    a.append([make_completion()])
    with pytest.raises(JournalLocked, match="--journal-dir"):
        journal(tmp_path / "j")
    a.close()
    assert journal(tmp_path / "j").backlog == 1


def test_the_store_dedupes_a_replayed_batch(tmp_path: Path) -> None:
    # A crash between the store's commit and the journal's read position replays a batch again.
    store = open_store(f"sqlite:///{tmp_path}/t.db")
    recs = [make_completion() for _ in range(3)]
    store.write_completions(recs)
    store.write_completions(recs)
    assert store.count_completions() == 3
    store.close()


class FlakyStore:
    """Only what CompletionLog uses: write_completions, insert-if-absent, that can be made to fail."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.down = threading.Event()

    def write_completions(self, records: Sequence[CompletionRecord]) -> None:
        if self.down.is_set():
            raise ConnectionError("connection refused")
        self.ids += [r.completion_id for r in records if r.completion_id not in self.ids]


def gauge(m: Metrics, name: str) -> float:
    v = m.registry.get_sample_value(name)
    assert v is not None
    return v


def test_an_outage_spills_to_the_journal_and_every_record_lands_once_in_order(tmp_path: Path) -> None:
    store, m = FlakyStore(), Metrics(CollectorRegistry())
    log = CompletionLog(store, m, max_batch=50, flush_interval_s=0.0, journal_dir=tmp_path / "j")  # type: ignore[arg-type]
    before = [make_completion() for _ in range(10)]
    log.submit(before)
    assert log.flush(5) and store.ids == [r.completion_id for r in before]

    store.down.set()
    during = [make_completion() for _ in range(1000)]
    for i in range(0, len(during), 10):
        log.submit(during[i : i + 10])
    # Memory stays bounded: nothing waits in memory, all of it is on disk.
    wait_until(lambda: gauge(m, "tuneloop_completion_log_journal_records") == 1000)
    assert gauge(m, "tuneloop_completion_log_queue_depth") == 0
    assert log.spilling and log.has_pending(["any id"]) and not log.flush(0.05)
    assert not log.close(timeout=0.2)  # the store is still down: the journal keeps the records

    log = CompletionLog(store, m, max_batch=50, flush_interval_s=0.0, journal_dir=tmp_path / "j")  # type: ignore[arg-type]
    assert log.spilling  # the next start finds them
    after = [make_completion() for _ in range(5)]
    log.submit(after)  # behind the journal, not around it
    store.down.clear()
    assert log.flush(10)
    assert store.ids == [r.completion_id for r in before + during + after]
    assert not log.spilling and not (tmp_path / "j" / "records.jsonl").exists()
    assert gauge(m, "tuneloop_completion_log_journal_records") == 0
    last = [make_completion()]
    log.submit(last)  # straight to the store again
    assert log.flush(5) and store.ids[-1] == last[0].completion_id
    assert log.close(5)


def test_without_a_journal_a_failed_batch_is_retried_in_memory(tmp_path: Path) -> None:
    store, m = FlakyStore(), Metrics(CollectorRegistry())
    log = CompletionLog(store, m, flush_interval_s=0.0)  # type: ignore[arg-type]
    store.down.set()
    rec = make_completion()
    log.submit([rec])
    wait_until(lambda: (m.registry.get_sample_value("tuneloop_completion_log_write_errors_total") or 0) >= 1)
    assert not log.spilling and gauge(m, "tuneloop_completion_log_queue_depth") == 1
    store.down.clear()
    assert log.flush(10) and store.ids == [rec.completion_id]
    assert log.close(5)


async def test_durable_answers_once_the_record_is_on_disk(tmp_path: Path) -> None:
    store, m = FlakyStore(), Metrics(CollectorRegistry())
    log = CompletionLog(store, m, flush_interval_s=5.0, journal_dir=tmp_path / "j")  # type: ignore[arg-type]
    rec = make_completion()
    log.submit([rec])
    # A waiting caller cuts the 5 s linger: the answer comes with the commit, not after it.
    assert await log.durable(rec.completion_id, timeout=2.0) and store.ids == [rec.completion_id]
    store.down.set()
    rec2 = make_completion()
    log.submit([rec2])
    assert await log.durable(rec2.completion_id, timeout=5.0)  # in the fsynced journal: on disk
    assert log.spilling and rec2.completion_id not in store.ids
    store.down.clear()
    assert log.flush(10) and log.close(5)


async def test_durable_says_no_when_nothing_reaches_the_disk_in_time() -> None:
    store, m = FlakyStore(), Metrics(CollectorRegistry())
    log = CompletionLog(store, m, flush_interval_s=0.0)  # type: ignore[arg-type]  # no journal
    store.down.set()
    rec = make_completion()
    log.submit([rec])
    assert not await log.durable(rec.completion_id, timeout=0.3)
    store.down.clear()
    assert await log.durable(rec.completion_id, timeout=10.0)
    assert log.close(5)
