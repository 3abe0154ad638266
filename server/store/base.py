"""The store interface: what the server, the feedback service and the trainer need from a database.

`SqlStore` implements it on SQLAlchemy Core (SQLite now; the same statements are meant to serve
PostgreSQL). Everything returns domain dataclasses, never rows.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..domain import CompletionRecord

if TYPE_CHECKING:
    from ..feedback import FeedbackRecord


@dataclass(frozen=True)
class CompletionRef:
    """The few columns of a completion that feedback validation and metrics need."""

    completion_id: str
    group_id: str
    candidate_index: int
    prompt_sha256: str
    adapter_name: str
    adapter_version: str


@dataclass(frozen=True)
class StoredEventKey:
    """What an already-stored event id must be compared with to tell a retry from a conflict."""

    event_id: str
    content_sha256: str
    seq: int
    supersedes: str | None


class FeedbackTx(Protocol):
    """Reads and writes of one feedback batch, all inside one transaction (committed on exit)."""

    def completion_refs(self, completion_ids: Collection[str]) -> dict[str, CompletionRef]:
        """The known completions among `completion_ids`, by id."""
        ...

    def group_refs(self, group_ids: Collection[str]) -> dict[str, list[CompletionRef]]:
        """The candidates of each known group, ordered by candidate index."""
        ...

    def stored_events(self, event_ids: Collection[str]) -> dict[str, StoredEventKey]:
        """The already-stored events among `event_ids`."""
        ...

    def current_judgements(self, completion_ids: Collection[str]) -> dict[tuple[str, str, str], str]:
        """Not-yet-superseded thumbs and ratings on these completions:
        (rater_id, completion_id, kind) -> event_id."""
        ...

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[int]:
        """Inserts the records (their `seq` is ignored); returns the assigned sequence numbers in order."""
        ...

    def mark_superseded(self, links: Sequence[tuple[str, str]]) -> None:
        """Sets `superseded_by` for each (older event_id, newer event_id)."""
        ...


class Store(Protocol):
    def write_completions(self, records: Sequence[CompletionRecord]) -> None:
        """Stores the records in one transaction. Idempotent: an id already stored is left as is,
        so a batch retried after an ambiguous failure cannot fail forever on its own rows."""
        ...

    def get_completion(self, completion_id: str) -> CompletionRecord | None: ...

    def get_completions(self, completion_ids: Collection[str]) -> dict[str, CompletionRecord]:
        """The known completions among `completion_ids`, by id."""
        ...

    def count_completions(self) -> int: ...

    def feedback_transaction(self) -> AbstractContextManager[FeedbackTx]:
        """One write transaction for a batch of feedback, committed durably on a clean exit."""
        ...

    def feedback_since(self, cursor: int, limit: int = 1000) -> list[FeedbackRecord]:
        """Feedback with seq > cursor, oldest first, at most `limit` (superseded rows included:
        their `superseded_by` says so, and a newer row names the row it supersedes)."""
        ...

    def iter_feedback(self, page_size: int = 1000) -> Iterator[FeedbackRecord]:
        """Every feedback row, oldest first, read page by page."""
        ...

    def feedback_for_prompt(self, prompt_sha256: str) -> list[FeedbackRecord]:
        """All feedback on completions of one rendered prompt, oldest first."""
        ...

    def get_feedback(self, event_id: str) -> FeedbackRecord | None: ...

    def count_feedback(self) -> int: ...

    def close(self) -> None: ...
