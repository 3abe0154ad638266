"""Live feedback per adapter version and canary evidence, read from a real store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from completion_factory import make_completion

from tuneloop.server.domain import CompletionRecord
from tuneloop.server.feedback import Choice, FeedbackEvent
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import CanaryEvidence, VersionFeedback, open_store

P = "Write a haiku about rain."
SINCE = 1_000_000.0  # the canary started here


async def test_version_feedback_and_canary_evidence(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    s1 = replace(make_completion(P, "old", adapter=("kind", "v1")), created_at=SINCE - 100)  # before the canary
    s2, c1, c2 = (replace(make_completion(P, text, adapter=("kind", v)), created_at=SINCE + 1)
                  for text, v in [("stable", "v1"), ("canary a", "v2"), ("canary b", "v2")])  # fmt: skip
    b1 = replace(make_completion(P, "base"), created_at=SINCE + 2)
    store.write_completions([s1, s2, c1, c2, b1])
    service = FeedbackService(store, Metrics())
    service.start()

    def thumbs(rec: CompletionRecord, up: bool, rater: str = "alice") -> FeedbackEvent:
        return FeedbackEvent(rater_id=rater, kind="thumbs", completion_id=rec.completion_id, thumb_up=up)

    def pick(first: CompletionRecord, second: CompletionRecord, choice: Choice) -> FeedbackEvent:
        ids = {"completion_id": first.completion_id, "second_completion_id": second.completion_id}
        return FeedbackEvent(rater_id="alice", kind="pairwise", choice=choice, **ids)

    for event in [
        thumbs(c1, True), thumbs(c1, False, rater="bob"), thumbs(s2, False), thumbs(s2, True), thumbs(s1, True),
        FeedbackEvent(rater_id="alice", kind="rating", completion_id=c1.completion_id, rating=4),
        FeedbackEvent(rater_id="alice", kind="rating", completion_id=c2.completion_id, rating=2),
        FeedbackEvent(rater_id="alice", kind="rating", completion_id=c2.completion_id, rating=5),  # replaces the 2
        pick(c1, s2, "first"), pick(s2, c2, "first"), pick(c1, s2, "tie"), pick(c1, b1, "second"),
    ]:  # fmt: skip
        await service.submit(event)
    await service.close()

    assert store.version_feedback("kind") == {
        "v1": VersionFeedback(thumbs_up=2, pairwise_wins=1, pairwise_losses=1),
        "v2": VersionFeedback(thumbs_up=1, thumbs_down=1, ratings=2, rating_sum=9, pairwise_wins=1, pairwise_losses=2),
    }
    assert store.version_feedback("other") == {}
    # Thumbs come with the time their completion was served, for the test to pair arms by time.
    served = SINCE + 1
    assert store.canary_evidence("kind", "v2", "v1", SINCE) == CanaryEvidence(
        canary_thumbs=[(served, True), (served, False)], stable_thumbs=[(served, True)], head_to_head=[True, False]
    )
    # No stable version: the base model serves the rest of the traffic and is the comparison.
    canary_only = CanaryEvidence([(served, True), (served, False)], [], [False])
    assert store.canary_evidence("kind", "v2", "", SINCE) == canary_only
    store.close()
