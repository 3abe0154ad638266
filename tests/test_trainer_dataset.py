"""The dataset builder's pairing rules (pure functions, no model)."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneloop.server.errors import InvalidArgument
from tuneloop.trainer.config import DatasetConfig
from tuneloop.trainer.dataset import (
    build_dataset,
    build_pointwise,
    cap_per_rater,
    count_new_examples,
    count_new_pairs,
    dedupe,
    rebuild_dataset,
    split_by_prompt,
)
from tuneloop.trainer.rows import CompletionRow, FeedbackRow

P1, P2 = "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\nbye<|im_end|>\n"
C = {
    "a": CompletionRow("a", P1, "Hello! How can I help?"),
    "b": CompletionRow("b", P1, "What."),
    "c": CompletionRow("c", P1, "Hi there."),
    "x": CompletionRow("x", P2, "Goodbye, take care!"),
    "y": CompletionRow("y", P2, "Leave."),
}
ALL = list(C.values())
_n = iter(range(10_000))


def fb(kind: str, rater: str, cid: str, **kw: object) -> FeedbackRow:
    i = next(_n)
    return FeedbackRow(event_id=f"e{i}", kind=kind, rater_id=rater, completion_id=cid, created_at=float(i), **kw)  # type: ignore[arg-type]


def pairs_of(ds) -> set[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    return {(p.source, p.chosen_text, p.rejected_text) for p in ds.pairs}


def build(feedback: list[FeedbackRow], **cfg: object):  # type: ignore[no-untyped-def]
    return build_dataset(ALL, feedback, DatasetConfig(**cfg))  # type: ignore[arg-type]


def test_pairwise_choice_and_tie() -> None:
    win = fb("pairwise", "r1", "a", other_completion_id="b", choice="b")
    tie = fb("pairwise", "r2", "a", other_completion_id="c", choice="")
    ds = build([win, tie])
    assert pairs_of(ds) == {("pairwise", "What.", "Hello! How can I help?")}
    assert ds.dropped["pairwise_tie"] == 1
    (pair,) = ds.pairs
    assert pair.event_ids == (win.event_id,) and pair.rater_ids == ("r1",)
    assert (pair.chosen_completion_id, pair.rejected_completion_id) == ("b", "a")


def test_pairwise_across_prompts_or_unknown_completions_is_dropped() -> None:
    ds = build([
        fb("pairwise", "r1", "a", other_completion_id="x", choice="a"),
        fb("pairwise", "r1", "a", other_completion_id="nope", choice="a"),
        fb("pairwise", "r1", "a", other_completion_id="b", choice="zzz"),
    ])  # fmt: skip
    assert ds.pairs == []
    assert ds.dropped == Counter(pairwise_different_prompts=1, pairwise_unknown_completion=1, pairwise_bad_choice=1)


def test_thumbs_up_against_thumbs_down_on_the_same_prompt() -> None:
    ds = build([
        fb("thumbs", "r1", "a", value=1), fb("thumbs", "r2", "b", value=-1),
        fb("thumbs", "r3", "c", value=1), fb("thumbs", "r4", "x", value=-1),  # x is another prompt
    ])  # fmt: skip
    assert pairs_of(ds) == {("thumbs", "Hello! How can I help?", "What."), ("thumbs", "Hi there.", "What.")}


def test_thumbs_are_netted_per_completion() -> None:
    ds = build([
        fb("thumbs", "r1", "a", value=1), fb("thumbs", "r2", "a", value=1), fb("thumbs", "r3", "a", value=-1),
        fb("thumbs", "r1", "b", value=-1),
        fb("thumbs", "r1", "c", value=1), fb("thumbs", "r2", "c", value=-1),  # tied: neither up nor down
    ])  # fmt: skip
    assert pairs_of(ds) == {("thumbs", "Hello! How can I help?", "What.")}
    assert ds.dropped["thumbs_outvoted"] == 1 and ds.dropped["thumbs_tied_completion"] == 2
    assert ds.pairs[0].rater_ids == ("r1", "r2")


def test_rating_gap_threshold_and_ties() -> None:
    feedback = [fb("rating", "r1", "a", value=5), fb("rating", "r1", "b", value=3), fb("rating", "r1", "c", value=5)]
    assert pairs_of(build(feedback, min_rating_gap=2.0)) == {
        ("rating", "Hello! How can I help?", "What."), ("rating", "Hi there.", "What."),
    }  # fmt: skip
    assert build(feedback, min_rating_gap=2.5).pairs == []  # gap 2 < 2.5; a vs c is a tie


def test_correction_against_the_original() -> None:
    ds = build([
        fb("correction", "r1", "b", text="Hello! Happy to help."),
        fb("correction", "r1", "a", text="Hello! How can I help?"),  # unchanged: a tie
    ])  # fmt: skip
    assert pairs_of(ds) == {("correction", "Hello! Happy to help.", "What.")}
    assert ds.dropped["correction_unchanged"] == 1
    assert ds.pairs[0].chosen_completion_id == "" and ds.pairs[0].rejected_completion_id == "b"


def test_superseded_feedback_is_dropped() -> None:
    ds = build([fb("thumbs", "r1", "a", value=1, superseded=True), fb("thumbs", "r2", "b", value=-1)])
    assert ds.pairs == [] and ds.dropped["superseded"] == 1


def test_duplicates_are_kept_once_by_priority_and_contradictions_dropped() -> None:
    pw = fb("pairwise", "r1", "a", other_completion_id="b", choice="a")
    ds = build([pw, fb("thumbs", "r2", "a", value=1), fb("thumbs", "r2", "b", value=-1)])
    assert pairs_of(ds) == {("pairwise", "Hello! How can I help?", "What.")}
    assert ds.dropped["duplicate"] == 1
    ds = build([
        fb("pairwise", "r1", "a", other_completion_id="b", choice="a"),
        fb("pairwise", "r2", "a", other_completion_id="b", choice="b"),
    ])  # fmt: skip
    assert ds.pairs == [] and ds.dropped["contradicted"] == 2


def test_identical_texts_are_ties() -> None:
    same = [CompletionRow("s1", P1, "ok"), CompletionRow("s2", P1, "ok ")]
    ds = build_dataset(same, [fb("pairwise", "r", "s1", other_completion_id="s2", choice="s1")], DatasetConfig())
    assert ds.pairs == [] and ds.dropped["tie_identical_texts"] == 1


def test_rater_cap_keeps_earliest_pairs() -> None:
    comps = [CompletionRow(f"c{i}", f"prompt {i // 2}", f"text {i}") for i in range(24)]
    spam = [
        fb("pairwise", "spammer", f"c{2 * k}", other_completion_id=f"c{2 * k + 1}", choice=f"c{2 * k}")
        for k in range(10)
    ]
    alice = [fb("pairwise", "alice", "c20", other_completion_id="c21", choice="c21")]
    ds = build_dataset(comps, spam + alice, DatasetConfig(max_pairs_per_rater=3))
    assert Counter(r for p in ds.pairs for r in p.rater_ids) == Counter(spammer=3, alice=1)
    kept_spam = sorted(p.event_ids[0] for p in ds.pairs if "spammer" in p.rater_ids)
    assert kept_spam == sorted(e.event_id for e in spam[:3])
    assert ds.dropped["rater_cap"] == 7


def test_cap_counts_every_rater_of_a_pair() -> None:
    ds = build([fb("thumbs", "r1", "a", value=1), fb("thumbs", "r1", "c", value=1), fb("thumbs", "r2", "b", value=-1)],
               max_pairs_per_rater=1)  # fmt: skip
    assert len(ds.pairs) == 1 and ds.dropped["rater_cap"] == 1


def test_heldout_split_is_by_prompt_and_stable() -> None:
    comps = [CompletionRow(f"c{i}{s}", f"prompt number {i}", f"{s} answer {i}") for i in range(40) for s in "ab"]
    feedback = [fb("pairwise", f"r{i}", f"c{i}a", other_completion_id=f"c{i}b", choice=f"c{i}a") for i in range(40)]
    ds = build_dataset(comps, feedback, DatasetConfig(heldout_fraction=0.25))
    train_prompts = {p.prompt_hash for p in ds.train}
    held_prompts = {p.prompt_hash for p in ds.heldout}
    assert train_prompts.isdisjoint(held_prompts) and 4 <= len(held_prompts) <= 18
    again = build_dataset(list(reversed(comps)), list(reversed(feedback)), DatasetConfig(heldout_fraction=0.25))
    assert {p.prompt_hash for p in again.heldout} == held_prompts
    assert ds.snapshot()["digest"] == again.snapshot()["digest"]


def test_split_gives_each_side_a_prompt_when_it_can() -> None:
    ds = build([fb("pairwise", "r", "a", other_completion_id="b", choice="a"),
                fb("pairwise", "r", "x", other_completion_id="y", choice="x")], heldout_fraction=0.01)  # fmt: skip
    assert len(ds.train) == 1 and len(ds.heldout) == 1
    train, held = split_by_prompt(ds.train, 0.99, "s")  # one prompt: all on one side
    assert len(train) + len(held) == 1


def test_snapshot_records_event_ids_and_rebuilds_exactly() -> None:
    feedback = [
        fb("pairwise", "r1", "a", other_completion_id="b", choice="a"),
        fb("thumbs", "r2", "x", value=1), fb("thumbs", "r3", "y", value=-1),
        fb("correction", "r4", "b", text="Hi! Glad you asked."),
        fb("rating", "r5", "c", value=5), fb("rating", "r5", "b", value=1),
        fb("comment", "r6", "a", text=""),
        fb("thumbs", "r7", "a", value=1, superseded=True),
    ]  # fmt: skip
    ds = build(feedback)
    snap = ds.snapshot()
    used = {e for p in ds.pairs for e in p.event_ids}
    assert snap["event_ids"] == sorted(used)
    assert feedback[-1].event_id not in used and feedback[-2].event_id not in used
    assert snap["train_pairs"] + snap["heldout_pairs"] == len(ds.pairs) == 4
    rebuilt = rebuild_dataset(snap, ALL, feedback)
    assert rebuilt.train == ds.train and rebuilt.heldout == ds.heldout
    assert rebuilt.snapshot()["digest"] == snap["digest"]


def test_new_pairs_are_those_with_unseen_events() -> None:
    feedback = [fb("pairwise", "r1", "a", other_completion_id="b", choice="a"),
                fb("pairwise", "r1", "x", other_completion_id="y", choice="x")]  # fmt: skip
    ds = build(feedback)
    assert count_new_pairs(ds, []) == 2
    assert count_new_pairs(ds, [feedback[0].event_id]) == 1
    assert count_new_pairs(ds, ds.event_ids) == 0


def test_thumbs_and_ratings_count_as_new_examples_only_for_algorithms_that_learn_from_them() -> None:
    # Thumbs on replies to different prompts, and a rating: no pair, but three judgements.
    feedback = [
        fb("thumbs", "r1", "a", value=1.0), fb("thumbs", "r2", "y", value=-1.0), fb("rating", "r3", "x", value=4.0)
    ]  # fmt: skip
    ds, pw = build(feedback), build_pointwise(ALL, feedback, DatasetConfig())
    assert ds.pairs == [] and len(pw.examples) == 3
    assert count_new_examples(ds, None, []) == (0, "pairs")  # DPO: nothing to train on
    assert count_new_examples(ds, pw, []) == (3, "pairs, thumbs and ratings")
    assert count_new_examples(ds, pw, [feedback[0].event_id]) == (2, "pairs, thumbs and ratings")


def test_helpers_are_pure_over_lists() -> None:
    dropped: Counter[str] = Counter()
    assert dedupe([], dropped) == [] and cap_per_rater([], 1, dropped) == [] and not dropped


def test_config_validation() -> None:
    with pytest.raises(InvalidArgument, match="min_rating_gap"):
        DatasetConfig(min_rating_gap=0)
    with pytest.raises(InvalidArgument, match="heldout_fraction"):
        DatasetConfig(heldout_fraction=1.0)
    with pytest.raises(InvalidArgument, match="every pair source is disabled"):
        DatasetConfig(use_pairwise=False, use_thumbs=False, use_ratings=False, use_corrections=False)
