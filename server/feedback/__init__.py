"""Feedback on served completions: `events` holds the domain types (what the store and the API
speak), `planning` the pure per-batch rules, `service` the group-commit writer. The package
exports the domain types; import the service from `tuneloop.server.feedback.service`."""

from __future__ import annotations

from .events import (
    KINDS,
    MAX_BATCH_EVENTS,
    MAX_COMMENT_BYTES,
    MAX_CORRECTION_BYTES,
    Choice,
    EventIdConflict,
    FeedbackAck,
    FeedbackBacklog,
    FeedbackBatch,
    FeedbackEvent,
    FeedbackRecord,
    InvalidFeedback,
    Kind,
    StoreUnavailable,
    UnknownCompletion,
    check_batch_size,
    rejection_reason,
)

__all__ = [
    "KINDS", "MAX_BATCH_EVENTS", "MAX_COMMENT_BYTES", "MAX_CORRECTION_BYTES", "Choice", "EventIdConflict",
    "FeedbackAck", "FeedbackBacklog", "FeedbackBatch", "FeedbackEvent", "FeedbackRecord", "InvalidFeedback", "Kind",
    "StoreUnavailable", "UnknownCompletion", "check_batch_size", "rejection_reason",
]  # fmt: skip
