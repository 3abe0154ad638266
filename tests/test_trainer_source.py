"""The trainer reads the store incrementally: only new events each poll, supersedes applied."""

from __future__ import annotations

from pathlib import Path

from completion_factory import make_completion
from prometheus_client import CollectorRegistry

from tuneloop.server.feedback import FeedbackEvent
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import open_store
from tuneloop.trainer.source import StoreSource


class CountingStore:
    """The real store, counting how many feedback rows each read returns."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store, self.rows_read = store, 0

    def feedback_since(self, cursor: tuple[int, int], limit: int = 1000):  # type: ignore[no-untyped-def]
        rows = self.store.feedback_since(cursor, limit)
        self.rows_read += len(rows)
        return rows

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.store, name)


async def test_incremental_load_reads_only_new_events_and_applies_supersedes(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    service = FeedbackService(store, Metrics(CollectorRegistry()))
    service.start()
    a, b = make_completion("p", "a"), make_completion("p", "b")
    store.write_completions([a, b])
    up = await service.submit(FeedbackEvent(rater_id="r", kind="thumbs", completion_id=a.completion_id, thumb_up=True))
    source = StoreSource(CountingStore(store), page_size=2)  # type: ignore[arg-type]
    completions, feedback = source.load()
    assert [f.event_id for f in feedback] == [up.event_id] and not feedback[0].superseded
    assert {c.completion_id for c in completions} == {a.completion_id}

    down = await service.submit(
        FeedbackEvent(rater_id="r", kind="thumbs", completion_id=a.completion_id, thumb_up=False)
    )
    pair = await service.submit(FeedbackEvent(rater_id="r", kind="pairwise", completion_id=a.completion_id,
                                              second_completion_id=b.completion_id, choice="second"))  # fmt: skip
    before = source.store.rows_read
    completions, feedback = source.load()
    assert source.store.rows_read - before == 2  # only the two new events were read
    by_id = {f.event_id: f for f in feedback}
    assert by_id[up.event_id].superseded and not by_id[down.event_id].superseded
    assert by_id[pair.event_id].choice == b.completion_id
    assert {c.completion_id for c in completions} == {a.completion_id, b.completion_id}
    # And the same picture as a fresh full read.
    fresh = StoreSource(store).load()[1]
    assert sorted(fresh, key=lambda f: f.event_id) == sorted(feedback, key=lambda f: f.event_id)
    await service.close()
    store.close()
