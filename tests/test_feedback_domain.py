"""Pure feedback logic: pb translation, static validation, and how one batch is planned."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from tuneloop.server.feedback import (
    MAX_BATCH_EVENTS,
    EventIdConflict,
    FeedbackAck,
    FeedbackBatch,
    FeedbackEvent,
    InvalidFeedback,
    UnknownCompletion,
)
from tuneloop.server.feedback.planning import BatchPlan
from tuneloop.server.store import CompletionRef, StoredEventKey
from tuneloop.v1 import feedback_pb2 as fpb

REFS = {
    cid: CompletionRef(cid, group, index, prompt, "kind", "v1")
    for cid, group, index, prompt in [("c1", "", 0, "p"), ("c2", "g", 0, "p"), ("c3", "g", 1, "p"), ("c4", "", 0, "q")]
}
GROUPS = {"g": [REFS["c2"], REFS["c3"]]}


def thumbs(event_id: str, cid: str = "c1", up: bool = True, rater: str = "r") -> FeedbackEvent:
    return FeedbackEvent(event_id=event_id, rater_id=rater, kind="thumbs", completion_id=cid, thumb_up=up)


def plan(stored: dict[str, StoredEventKey] | None = None, current: dict[str, str] | None = None) -> BatchPlan:
    return BatchPlan(REFS, GROUPS, stored or {}, dict(current or {}), now=1.0)


def test_from_pb_maps_each_kind_and_enum() -> None:
    msg = fpb.FeedbackEvent(
        rater_id="r", comment_text="hm", reason_tags=["a", "b"],
        pairwise=fpb.PairwiseFeedback(group_id="g", choice=fpb.PAIRWISE_CHOICE_TIE),
    )  # fmt: skip
    e = FeedbackEvent.from_pb(msg)
    assert (e.kind, e.group_id, e.choice, e.reason_tags, e.comment_text) == ("pairwise", "g", "tie", ("a", "b"), "hm")
    down = FeedbackEvent.from_pb(fpb.FeedbackEvent(rater_id="r", thumbs=fpb.ThumbsFeedback(value=fpb.THUMB_DOWN)))
    assert down.thumb_up is False
    unset = FeedbackEvent.from_pb(fpb.FeedbackEvent(rater_id="r", thumbs=fpb.ThumbsFeedback(completion_id="c1")))
    with pytest.raises(InvalidFeedback, match="thumbs.value is unset"):
        unset.validate()


def test_content_hash_ignores_the_event_id_only() -> None:
    assert thumbs("a").content_sha256 == thumbs("b").content_sha256
    assert thumbs("a").content_sha256 != thumbs("a", up=False).content_sha256
    assert thumbs("a").judgement_key == thumbs("b", up=False).judgement_key != thumbs("c", rater="s").judgement_key


def test_content_hash_and_judgement_key_keep_their_stored_format() -> None:
    # Both are stored: an event retried after an upgrade must still match its row.
    e = FeedbackEvent(event_id="x", rater_id="rà", kind="rating", completion_id="c1", rating=4,
                      comment_text='é "q"\n', reason_tags=("a", "b"))  # fmt: skip
    fields = ["rà", "rating", "c1", "", "", None, 4, None, None, 'é "q"\n', ["a", "b"]]
    assert e.content_sha256 == hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()
    assert e.judgement_key == json.dumps(["rating", "c1", "rà"], ensure_ascii=False)
    assert replace(e, event_id="y").content_sha256 == e.content_sha256  # the cache is not copied stale
    assert replace(e, rating=5).content_sha256 != e.content_sha256


def test_batch_from_pb_counts_the_events_before_converting_them() -> None:
    full = fpb.SubmitFeedbackBatchRequest(events=[fpb.FeedbackEvent(rater_id="r")] * MAX_BATCH_EVENTS)
    assert len(FeedbackBatch.from_pb(full).events) == MAX_BATCH_EVENTS
    over = fpb.SubmitFeedbackBatchRequest(events=[fpb.FeedbackEvent()] * (MAX_BATCH_EVENTS + 1))
    with pytest.raises(InvalidFeedback, match=f"at most {MAX_BATCH_EVENTS} events, got {MAX_BATCH_EVENTS + 1}"):
        FeedbackBatch.from_pb(over)


def test_pairwise_target_rules() -> None:
    base = FeedbackEvent(rater_id="r", kind="pairwise", choice="first")
    with pytest.raises(InvalidFeedback, match="not both"):
        replace(base, group_id="g", completion_id="c2").validate()
    p = plan()
    p.add(replace(base, completion_id="c1", second_completion_id="c4"))
    p.add(replace(base, completion_id="c1", second_completion_id="c9"))
    p.add(replace(base, group_id="g", event_id="ok"))
    assert isinstance(p.outcomes[0], InvalidFeedback) and p.outcomes[0].reason == "different_prompts"
    assert isinstance(p.outcomes[1], UnknownCompletion) and "'c9'" in str(p.outcomes[1])
    assert (p.records[0].completion_id, p.records[0].second_completion_id) == ("c2", "c3")


def test_batch_plan_handles_retries_conflicts_and_supersedes_inside_one_batch() -> None:
    stored = {"old": StoredEventKey("old", thumbs("old").content_sha256, 7, None)}
    p = plan(stored, current={thumbs("x").judgement_key: "old"})  # type: ignore[dict-item]
    for e in [thumbs("old"), thumbs("old", up=False), thumbs("n1", up=False), thumbs("n1", up=False), thumbs("n2")]:
        p.add(e)
    assert p.outcomes[0] == FeedbackAck("old", True, 7, "")
    assert isinstance(p.outcomes[1], EventIdConflict)
    assert p.outcomes[2:] == [(0, False), (0, True), (1, False)]
    assert p.links == [("old", "n1")]  # stored row: updated in the store
    n1, n2 = p.records
    assert (n1.supersedes, n1.superseded_by, n2.supersedes, n2.superseded_by) == ("old", "n2", "n1", None)
    acks = p.acks([10, 11])
    assert acks[2:] == [FeedbackAck("n1", False, 10, "old"), FeedbackAck("n1", True, 10, "old"),
                        FeedbackAck("n2", False, 11, "n1")]  # fmt: skip
