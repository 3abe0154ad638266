"""The store on a real SQLite file: migrations, completion round trip, the background completion log."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from completion_factory import make_completion, make_group
from sqlalchemy import create_engine, inspect

from tuneloop.server.completion_log import CompletionLog
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import SchemaTooNew, open_store, prompt_sha256
from tuneloop.server.store.migrations import LATEST_VERSION, MIGRATIONS
from tuneloop.server.store.schema import metadata
from tuneloop.server.store.sql import SqlStore


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nested/dir/tuneloop.db"


def _versions(tmp_path: Path) -> list[int]:
    with sqlite3.connect(tmp_path / "nested/dir/tuneloop.db") as db:
        return [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY version")]


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


# --- migrations ---


def test_fresh_store_applies_every_migration_in_order(tmp_path: Path) -> None:
    store = open_store(_url(tmp_path))
    store.close()
    assert _versions(tmp_path) == [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    with sqlite3.connect(tmp_path / "nested/dir/tuneloop.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {
        "ix_completions_group_id", "ix_completions_created_at", "ix_completions_adapter",
        "ix_completions_prompt_sha256", "ix_feedback_prompt_sha256", "ux_feedback_current_judgement",
    } <= indexes  # fmt: skip


def test_migrated_columns_match_the_query_schema(tmp_path: Path) -> None:
    """The frozen migration DDL and schema.py must describe the same tables."""
    open_store(_url(tmp_path)).close()
    insp = inspect(create_engine(_url(tmp_path)))
    for table in metadata.sorted_tables:
        assert [c["name"] for c in insp.get_columns(table.name)] == [c.name for c in table.columns], table.name


def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    store = open_store(_url(tmp_path))
    rec = make_completion()
    store.write_completions([rec])
    store.close()
    store = open_store(_url(tmp_path))
    assert store.get_completion(rec.completion_id) == rec
    store.close()
    assert _versions(tmp_path) == list(range(1, LATEST_VERSION + 1))


def test_database_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    open_store(_url(tmp_path)).close()
    with sqlite3.connect(tmp_path / "nested/dir/tuneloop.db") as db:
        db.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=rf"schema version {LATEST_VERSION + 1} .* up to {LATEST_VERSION}"):
        open_store(_url(tmp_path))


@pytest.mark.parametrize("url", ["postgresql://db/tuneloop", "tuneloop.db", "sqlite://"])
def test_unsupported_urls_name_the_supported_scheme(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///"):
        open_store(url)


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        open_store("sqlite:///:memory:")


# --- completions ---


def test_completion_round_trip_and_idempotent_write(tmp_path: Path) -> None:
    store = open_store(_url(tmp_path))
    group = make_group("Tell me a joke.", ["one", "two"], adapter=("kind", "v3"))
    plain = make_completion(output="x")
    no_logprobs = make_completion(output="y")
    no_logprobs = type(no_logprobs)(**{**no_logprobs.__dict__, "output_logprobs": None})
    store.write_completions([*group, plain, no_logprobs])
    store.write_completions([plain])  # a retried batch must not fail on its own rows
    assert store.count_completions() == 4
    for rec in [*group, plain, no_logprobs]:
        assert store.get_completion(rec.completion_id) == rec
    assert store.get_completion("cmpl-missing") is None
    assert set(store.get_completions([group[0].completion_id, "nope"])) == {group[0].completion_id}
    store.close()
    with sqlite3.connect(tmp_path / "nested/dir/tuneloop.db") as db:
        (sha,) = db.execute("SELECT prompt_sha256 FROM completions WHERE completion_id = ?", (plain.completion_id,))
    assert sha[0] == prompt_sha256(plain.prompt_text)


# --- completion log ---


def test_completion_log_batches_and_flushes(tmp_path: Path) -> None:
    store, metrics = open_store(_url(tmp_path)), Metrics()
    log = CompletionLog(store, metrics, max_batch=64, flush_interval_s=0.02)
    records = [make_completion(output=f"answer {i}") for i in range(300)]
    for r in records:
        log.submit([r])
    assert log.flush(timeout=10)
    assert store.count_completions() == 300
    assert _sample(metrics, "tuneloop_completion_log_written_total") == 300
    assert _sample(metrics, "tuneloop_completion_log_queue_depth") == 0
    batches = _sample(metrics, "tuneloop_completion_log_batch_seconds_count")
    assert 300 / 64 <= batches < 100, "records submitted together must share transactions"
    assert not log.has_pending([records[-1].completion_id])
    assert log.close(timeout=5)


def test_close_drains_everything_queued(tmp_path: Path) -> None:
    store = open_store(_url(tmp_path))
    log = CompletionLog(store, Metrics(), max_batch=50, flush_interval_s=0.5)
    log.submit([make_completion(output=f"a{i}") for i in range(500)])
    assert log.close(timeout=10)
    store.close()
    assert open_store(_url(tmp_path)).count_completions() == 500
    with pytest.raises(RuntimeError, match="closed"):
        log.submit([make_completion()])


def test_failed_batch_is_retried_until_the_lock_is_released(tmp_path: Path) -> None:
    url = _url(tmp_path)
    store = SqlStore.open(url, busy_timeout_s=0.05)
    metrics = Metrics()
    log = CompletionLog(store, metrics, flush_interval_s=0.0)
    blocker = sqlite3.connect(tmp_path / "nested/dir/tuneloop.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    rec = make_completion()
    log.submit([rec])
    assert log.has_pending([rec.completion_id, rec.group_id])
    assert not log.flush(timeout=0.5)
    assert _sample(metrics, "tuneloop_completion_log_write_errors_total") >= 1
    blocker.rollback()
    assert log.flush(timeout=10)
    assert store.get_completion(rec.completion_id) == rec
    assert log.close(timeout=5)


def test_close_gives_up_after_its_timeout_when_the_store_keeps_failing(tmp_path: Path) -> None:
    store = SqlStore.open(_url(tmp_path), busy_timeout_s=0.02)
    log = CompletionLog(store, Metrics(), flush_interval_s=0.0)
    blocker = sqlite3.connect(tmp_path / "nested/dir/tuneloop.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    log.submit([make_completion()])
    t0 = time.monotonic()
    assert not log.close(timeout=0.3)
    assert time.monotonic() - t0 < 5
    blocker.rollback()


def test_store_keeps_at_most_one_current_judgement_per_rater_and_completion(tmp_path: Path) -> None:
    """The partial unique index guards the supersede rule even against a second writer."""
    from sqlalchemy.exc import IntegrityError

    from tuneloop.server.feedback import FeedbackEvent, FeedbackRecord

    store = open_store(_url(tmp_path))
    rec = make_completion()
    store.write_completions([rec])

    def thumbs(event_id: str, superseded_by: str | None = None) -> FeedbackRecord:
        event = FeedbackEvent(event_id=event_id, rater_id="r", kind="thumbs", completion_id=rec.completion_id,
                              thumb_up=True)  # fmt: skip
        return FeedbackRecord(0, event, rec.completion_id, None, prompt_sha256(rec.prompt_text), 0.0,
                              superseded_by=superseded_by)  # fmt: skip

    with store.feedback_transaction() as tx:
        assert tx.insert_feedback([thumbs("a", superseded_by="b"), thumbs("b")]) == [1, 2]
    with pytest.raises(IntegrityError), store.feedback_transaction() as tx:
        tx.insert_feedback([thumbs("c")])
    with store.feedback_transaction() as tx:
        assert tx.current_judgements([thumbs("x").event.judgement_key]) == {thumbs("x").event.judgement_key: "b"}
    assert [r.event_id for r in store.feedback_since((0, 1))] == ["b"]
    with store.feedback_transaction() as tx:  # seqs read from the two ends only when consecutive
        assert tx.insert_feedback([thumbs("d", superseded_by="e"), thumbs("e", superseded_by="f")]) == [3, 4]
        assert tx._consecutive_seqs(["a", "d"]) is None  # 1 and 3: read row by row instead
        assert tx._seqs(["a", "d"]) == [1, 3]


def test_a_driver_error_while_rows_are_fetched_is_a_store_error_the_writer_retries(tmp_path: Path) -> None:
    """sqlite3 computes a query's rows as they are fetched, past SQLAlchemy's own wrapping: the
    writer's reads wrap such an error as SQLAlchemy does one from execute (DBAPIError, retried)."""
    from sqlalchemy.exc import OperationalError

    store = open_store(_url(tmp_path))
    overflow_on_second_row = "SELECT abs(-9223372036854775807 - value) FROM json_each('[0, 1]')"
    with pytest.raises(OperationalError, match="integer overflow"), store.feedback_transaction() as tx:
        tx._fetch(overflow_on_second_row, [])
