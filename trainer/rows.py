"""The rows the dataset builder reads, and the pairs it makes.

These are the trainer's own view of the completion log and the feedback table: plain frozen
dataclasses, so the builder is a set of pure functions testable without a database. A thin
adapter (`tuneloop.trainer.source`) fills them from the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from tuneloop.server.domain import prompt_sha256

THUMBS, RATING, PAIRWISE, CORRECTION, COMMENT = "thumbs", "rating", "pairwise", "correction", "comment"
FEEDBACK_KINDS = (THUMBS, RATING, PAIRWISE, CORRECTION, COMMENT)


@dataclass(frozen=True)
class CompletionRow:
    """One served candidate: the prompt it answered (after the chat template) and its text."""

    completion_id: str
    prompt_text: str
    text: str
    prompt_hash: str = ""  # filled from prompt_text when empty
    adapter_name: str = "base"
    adapter_version: str = "base"
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompt_hash:
            object.__setattr__(self, "prompt_hash", prompt_sha256(self.prompt_text))


@dataclass(frozen=True)
class FeedbackRow:
    """One feedback event on a completion.

    kind       thumbs | rating | pairwise | correction | comment
    value      thumbs: +1 up / -1 down; rating: 1..5; otherwise unused
    choice     pairwise only: the winning completion id (`completion_id` or `other_completion_id`);
               "" means a tie / no preference
    text       correction only: the text the rater says the completion should have been
    superseded a later event by the same rater replaced this one; never used
    """

    event_id: str
    kind: str
    rater_id: str
    completion_id: str
    value: float | None = None
    other_completion_id: str = ""
    choice: str = ""
    text: str = ""
    superseded: bool = False
    created_at: float = 0.0


@dataclass(frozen=True)
class PreferencePair:
    """A training or held-out example: for `prompt_text`, `chosen_text` is preferred.

    `event_ids` are the feedback events this pair was made from and `rater_ids` who gave them;
    the completion ids say where the texts came from ("" for a correction's chosen text).
    """

    prompt_text: str
    prompt_hash: str
    chosen_text: str
    rejected_text: str
    source: str
    event_ids: tuple[str, ...]
    rater_ids: tuple[str, ...]
    chosen_completion_id: str
    rejected_completion_id: str
    created_at: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        """Content identity: the same prompt and the same two texts in the same order."""
        return (self.prompt_hash, _h(self.chosen_text), _h(self.rejected_text))

    def to_record(self) -> dict[str, Any]:
        """Compact provenance for the manifest: enough to rebuild the pair from the store."""
        return {
            "source": self.source,
            "events": list(self.event_ids),
            "chosen": self.chosen_completion_id,
            "rejected": self.rejected_completion_id,
        }


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
