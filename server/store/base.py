"""The store interface: what the server, the feedback service and the trainer need from a database.

`SqlStore` implements it on SQLAlchemy Core (SQLite now; the same statements are meant to serve
PostgreSQL). Everything returns domain dataclasses, never rows.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from ..domain import CompletionRecord
from ..feedback.events import FeedbackRecord


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


@dataclass(frozen=True)
class VersionFeedback:
    """Live feedback on one adapter version's completions (current judgements only)."""

    thumbs_up: int = 0
    thumbs_down: int = 0
    ratings: int = 0
    rating_sum: int = 0
    pairwise_wins: int = 0  # pairwise choices won by a completion of this version (ties excluded)
    pairwise_losses: int = 0


@dataclass(frozen=True)
class CanaryEvidence:
    """What a canary's sequential test reads: feedback on completions served since it started.
    Thumbs come as (completion served at, thumbs up) in order of serving time, so the test can
    pair the arms' outcomes by time; pairwise choices in the order they arrived."""

    canary_thumbs: list[tuple[float, bool]]  # (served at, True: thumbs up) on canary completions
    stable_thumbs: list[tuple[float, bool]]
    head_to_head: list[bool]  # pairwise choices between a canary and a stable completion; True: canary chosen


@dataclass(frozen=True)
class Lease:
    """A named lease as its holder got it. Times are the database's clock (unix seconds)."""

    name: str
    holder: str
    token: int  # fencing token: grows each time the lease is taken anew, never on a renewal
    expires_at: float  # 0 once released
    acquired_at: float  # when this holder's term began


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

    def current_judgements(self, judgement_keys: Collection[str]) -> dict[str, str]:
        """The not-yet-superseded event of each judgement key that has one: key -> event_id."""
        ...

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[int]:
        """Inserts the records (their `seq` is ignored); returns the assigned sequence numbers in order."""
        ...

    def mark_superseded(self, links: Sequence[tuple[str, str]]) -> None:
        """Sets `superseded_by` for each (older event_id, newer event_id). Call it before
        inserting the newer rows: only one row per judgement key may be current at a time."""
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

    def feedback_since(self, cursor: tuple[int, int] = (0, 0), limit: int = 1000) -> list[FeedbackRecord]:
        """Feedback after `cursor` (a row's `cursor`; (0, 0) for the start) in commit-safe order, at
        most `limit` (superseded rows included: their `superseded_by` says so, and a newer row
        names the row it supersedes). Resuming from the last row's cursor never skips a row, even
        with several writers whose transactions commit out of sequence order."""
        ...

    def iter_feedback(self, page_size: int = 1000) -> Iterator[FeedbackRecord]:
        """Every feedback row, oldest first, read page by page."""
        ...

    def feedback_for_prompt(self, prompt_sha256: str) -> list[FeedbackRecord]:
        """All feedback on completions of one rendered prompt, oldest first."""
        ...

    def get_feedback(self, event_id: str) -> FeedbackRecord | None: ...

    def version_feedback(self, adapter_name: str) -> dict[str, VersionFeedback]:
        """Feedback totals per version of one adapter (versions without feedback are absent)."""
        ...

    def canary_evidence(
        self, adapter_name: str, canary_version: str, stable_version: str, since: float
    ) -> CanaryEvidence:
        """Feedback on completions served at or after `since` (unix seconds) by the canary and by
        the stable version ("" for the base model, which serves while no version is stable)."""
        ...

    def count_feedback(self) -> int: ...

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Takes the lease `name` for `holder` until `ttl_s` from now (database clock), or renews
        it when `holder` already holds it; None while another holder's lease runs. One atomic
        conditional write: among concurrent callers at most one holds it at any instant. The
        fencing token grows when the lease is taken anew (new holder, or a lapsed or released
        term of the same one) and stays the same on a renewal."""
        ...

    def lease_is_current(self, lease: Lease) -> bool:
        """True while `lease` (its holder and token) is unexpired: an act guarded by the lease
        checks this right before it happens."""
        ...

    def release_lease(self, lease: Lease) -> bool:
        """Ends `lease` now so another holder can take it at once; False if it was no longer
        current (lapsed, or taken over). The row and its token stay: tokens never go back."""
        ...

    def get_lease(self, name: str) -> Lease | None:
        """The lease's row as it stands (possibly expired or released), None if never taken."""
        ...

    def close(self) -> None: ...
