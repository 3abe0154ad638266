"""Reads completions and feedback from the server's store into the trainer's rows.

Only the store's public read methods are used (`iter_feedback`, `get_completions`), so the trainer
never depends on table layout, and the translation below is the one place that knows both sides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from tuneloop.server.domain import CompletionRecord
from tuneloop.server.feedback import FeedbackRecord
from tuneloop.server.store import Store, open_store

from .rows import CompletionRow, FeedbackRow

# Completions are fetched in chunks to keep each IN (...) query small.
_CHUNK = 500


def feedback_row(rec: FeedbackRecord) -> FeedbackRow:
    ev = rec.event
    value: float | None = None
    choice = ""
    if ev.kind == "thumbs":
        value = None if ev.thumb_up is None else (1.0 if ev.thumb_up else -1.0)
    elif ev.kind == "rating":
        value = None if ev.rating is None else float(ev.rating)
    elif ev.kind == "pairwise":
        # "tie" (or anything unknown) stays "", which the builder treats as no preference.
        choice = {"first": rec.completion_id, "second": rec.second_completion_id or ""}.get(ev.choice or "", "")
    return FeedbackRow(
        event_id=rec.event_id,
        kind=ev.kind,
        rater_id=ev.rater_id,
        completion_id=rec.completion_id,
        value=value,
        other_completion_id=rec.second_completion_id or "",
        choice=choice,
        text=ev.corrected_text or "",
        superseded=not rec.is_current,
        created_at=rec.created_at,
    )


def completion_row(rec: CompletionRecord) -> CompletionRow:
    return CompletionRow(
        completion_id=rec.completion_id,
        prompt_text=rec.prompt_text,
        text=rec.output_text,
        adapter_name=rec.adapter_name,
        adapter_version=rec.adapter_version,
        created_at=rec.created_at,
    )


class StoreSource:
    """`FeedbackSource` over a `Store`: every feedback event, and the completions they name.

    Reads incrementally: each `load` fetches only the events after the last one it saw (the
    store's "new since cursor" read) and the completions they name, and keeps the rest in memory,
    so a sidecar polling every few seconds does not re-read the whole history. A new event that
    supersedes an earlier one marks the cached row superseded.
    """

    def __init__(self, store: Store, page_size: int = 5000) -> None:
        self.store = store
        self._page = page_size
        self._cursor = (0, 0)
        self._feedback: dict[str, FeedbackRow] = {}
        self._completions_by_id: dict[str, CompletionRow] = {}

    @classmethod
    def open(cls, url: str) -> StoreSource:
        return cls(open_store(url))

    def load(self) -> tuple[list[CompletionRow], list[FeedbackRow]]:
        while batch := self.store.feedback_since(self._cursor, limit=self._page):
            named: set[str] = set()
            for rec in batch:
                row = feedback_row(rec)
                self._feedback[rec.event_id] = row
                named |= {row.completion_id, row.other_completion_id}
                # Only a real id supersedes: "" must not match an event whose own id is empty.
                old = self._feedback.get(rec.supersedes) if rec.supersedes else None
                if old is not None:
                    self._feedback[old.event_id] = replace(old, superseded=True)
                self._cursor = max(self._cursor, rec.cursor)
            missing = sorted(named - {""} - self._completions_by_id.keys())
            for c in self._completions(missing):
                self._completions_by_id[c.completion_id] = completion_row(c)
        return list(self._completions_by_id.values()), list(self._feedback.values())

    def _completions(self, ids: list[str]) -> Iterable[CompletionRecord]:
        for i in range(0, len(ids), _CHUNK):
            yield from self.store.get_completions(ids[i : i + _CHUNK]).values()

    def close(self) -> None:
        self.store.close()
