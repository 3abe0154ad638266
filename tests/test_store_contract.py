"""The `Store` contract on every backend: SQLite (embedded) and a real PostgreSQL server."""

from __future__ import annotations

from dataclasses import replace

import pytest
from completion_factory import make_completion, make_group
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError

from tuneloop.server.feedback import EventIdConflict, FeedbackEvent, FeedbackRecord, UnknownCompletion
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import Store, open_store, prompt_sha256
from tuneloop.server.store.migrations import LATEST_VERSION
from tuneloop.server.store.schema import metadata


def _thumbs(rec_id: str, prompt: str, event_id: str, superseded_by: str | None = None) -> FeedbackRecord:
    event = FeedbackEvent(event_id=event_id, rater_id="r", kind="thumbs", completion_id=rec_id, thumb_up=True)
    return FeedbackRecord(0, event, rec_id, None, prompt_sha256(prompt), 0.0, superseded_by=superseded_by)


def test_migrations_create_the_query_schema_and_reopen_is_idempotent(store_url: str, store: Store) -> None:
    rec = make_completion()
    store.write_completions([rec])
    store.close()
    reopened = open_store(store_url)
    assert reopened.get_completion(rec.completion_id) == rec
    reopened.close()
    engine = create_engine(store_url)
    insp = inspect(engine)
    for table in metadata.sorted_tables:
        assert [c["name"] for c in insp.get_columns(table.name)] == [c.name for c in table.columns], table.name
    with engine.connect() as conn:
        versions = [v for (v,) in conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY version")]
    engine.dispose()
    assert versions == list(range(1, LATEST_VERSION + 1))


def test_completion_round_trip_and_idempotent_write(store: Store) -> None:
    group = make_group("Tell me a joke.", ["one", "two"], adapter=("kind", "v3"))
    plain = make_completion(output="x")
    store.write_completions([*group, plain])
    store.write_completions([plain])  # a retried batch must not fail on its own rows
    assert store.count_completions() == 3
    for rec in [*group, plain]:
        assert store.get_completion(rec.completion_id) == rec
    assert store.get_completion("cmpl-missing") is None
    assert set(store.get_completions([group[0].completion_id, "nope"])) == {group[0].completion_id}


def test_feedback_sequence_supersede_and_reads(store: Store) -> None:
    rec = make_completion(adapter=("kind", "v1"))
    store.write_completions([rec])
    with store.feedback_transaction() as tx:
        assert tx.insert_feedback([_thumbs(rec.completion_id, rec.prompt_text, "a", superseded_by="b"),
                                   _thumbs(rec.completion_id, rec.prompt_text, "b")]) == [1, 2]  # fmt: skip
    with pytest.raises(IntegrityError), store.feedback_transaction() as tx:
        tx.insert_feedback([_thumbs(rec.completion_id, rec.prompt_text, "c")])  # a second current judgement
    key = _thumbs(rec.completion_id, rec.prompt_text, "x").event.judgement_key
    with store.feedback_transaction() as tx:
        assert tx.current_judgements([key]) == {key: "b"}
        assert set(tx.stored_events(["a", "zz"])) == {"a"}
        assert set(tx.completion_refs([rec.completion_id])) == {rec.completion_id}
    a = store.get_feedback("a")
    assert a is not None and [r.event_id for r in store.feedback_since(a.cursor)] == ["b"]
    assert [r.event_id for r in store.iter_feedback(page_size=1)] == ["a", "b"]
    assert [r.event_id for r in store.feedback_for_prompt(prompt_sha256(rec.prompt_text))] == ["a", "b"]
    got = store.get_feedback("a")
    assert got is not None and got.superseded_by == "b" and got.event.thumb_up is True
    assert store.count_feedback() == 2
    totals = store.version_feedback("kind")
    assert totals["v1"].thumbs_up == 1 and totals["v1"].thumbs_down == 0


async def test_the_feedback_writer_applies_its_rules_on_each_backend(store: Store) -> None:
    """The writer's own SQL (driver-level, per dialect) behind the rules: retries, reused ids,
    unknown completions, supersede links, pairwise by group, and tags (non-ASCII too) as sent."""
    rec = make_completion(adapter=("kind", "v1"))
    pair = make_group(rec.prompt_text, ["left", "right"])
    store.write_completions([rec, *pair])

    def thumbs(event_id: str, up: bool, completion_id: str = rec.completion_id) -> FeedbackEvent:
        tags = ("zu lang", "naïve") if not up else ()
        return FeedbackEvent(
            event_id=event_id, rater_id="r", kind="thumbs", completion_id=completion_id, thumb_up=up, reason_tags=tags
        )

    service = FeedbackService(store, Metrics())
    service.start()
    try:
        first = await service.submit(thumbs("t1", up=False))
        assert await service.submit(thumbs("t1", up=False)) == replace(first, duplicate=True)
        with pytest.raises(EventIdConflict):
            await service.submit(thumbs("t1", up=True))
        with pytest.raises(UnknownCompletion):
            await service.submit(thumbs("t3", up=True, completion_id="cmpl-missing"))
        newer = await service.submit(thumbs("t2", up=True))
        assert newer.superseded_event_id == "t1" and newer.sequence > first.sequence
        choice = FeedbackEvent(event_id="p1", rater_id="r", kind="pairwise", group_id=pair[0].group_id, choice="second")
        await service.submit(choice)
    finally:
        assert await service.close()
    old, new, p = store.get_feedback("t1"), store.get_feedback("t2"), store.get_feedback("p1")
    assert old is not None and old.superseded_by == "t2" and old.event == thumbs("t1", up=False)
    assert new is not None and new.supersedes == "t1" and new.is_current
    assert p is not None and (p.completion_id, p.second_completion_id) == (pair[0].completion_id, pair[1].completion_id)
    assert p.event == choice and p.prompt_sha256 == prompt_sha256(rec.prompt_text)
    assert store.count_feedback() == 3


def test_an_incremental_reader_misses_no_row_that_commits_out_of_order(postgres) -> None:  # type: ignore[no-untyped-def]
    """Two writers: A takes seq 1 and commits last, B takes seq 2 and commits first. A reader that
    followed "seq greater than the cursor" would read B, move its cursor to 2 and never see A."""
    import threading

    from tuneloop.trainer.source import StoreSource

    store = open_store(postgres.create_database())
    rec = make_completion()
    store.write_completions([rec])
    source = StoreSource(store)
    a_inserted, a_commit = threading.Event(), threading.Event()

    def writer_a() -> None:
        with store.feedback_transaction() as tx:
            tx.insert_feedback([_thumbs(rec.completion_id, rec.prompt_text, "a")])
            a_inserted.set()
            assert a_commit.wait(30)

    t = threading.Thread(target=writer_a)
    t.start()
    try:
        assert a_inserted.wait(30)
        other = make_completion()
        store.write_completions([other])
        with store.feedback_transaction() as tx:
            tx.insert_feedback([_thumbs(other.completion_id, other.prompt_text, "b")])
        b = store.get_feedback("b")
        assert b is not None and b.seq == 2  # committed, with the higher sequence number
        _, seen = source.load()
        assert [f.event_id for f in seen] == []  # held back while A, older, may still commit
    finally:
        a_commit.set()
        t.join()
    _, seen = source.load()
    assert sorted(f.event_id for f in seen) == ["a", "b"]
    assert [r.event_id for r in store.iter_feedback()] == ["a", "b"]
    store.close()
