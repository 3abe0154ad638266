"""Dataset export: the pure pairing functions, and JSONL export from a real store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from completion_factory import make_completion, make_group

from tuneloop.server.domain import CompletionRecord
from tuneloop.server.export import (
    correction_pairs,
    export,
    pairwise_pairs,
    preference_pairs,
    rated_examples,
    thumbs_pairs,
    unpaired_examples,
)
from tuneloop.server.feedback import FeedbackEvent, FeedbackRecord, FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import open_store, prompt_sha256

P, Q = "Greet me.", "Say bye."


def _record(seq: int, completion: CompletionRecord, *, superseded: bool = False, second: CompletionRecord | None = None,
            **event: object) -> FeedbackRecord:  # fmt: skip
    return FeedbackRecord(
        seq=seq,
        event=FeedbackEvent(event_id=f"e{seq}", rater_id=str(event.pop("rater", "r")), **event),  # type: ignore[arg-type]
        completion_id=completion.completion_id,
        second_completion_id=second.completion_id if second else None,
        prompt_sha256=prompt_sha256(completion.prompt_text),
        created_at=0.0,
        superseded_by="later" if superseded else None,
    )


@pytest.fixture
def cs() -> dict[str, CompletionRecord]:
    named = {
        "p_hi": make_completion(P, "Hi!"),
        "p_hello": make_completion(P, "Hello there."),
        "p_go": make_completion(P, "Go away."),
        "q_bye": make_completion(Q, "Bye!"),
        "q_meh": make_completion(Q, "Whatever."),
    }
    return named


def _by_id(cs: dict[str, CompletionRecord]) -> dict[str, CompletionRecord]:
    return {c.completion_id: c for c in cs.values()}


def test_pairwise_choices_become_pairs_and_ties_are_skipped(cs: dict[str, CompletionRecord]) -> None:
    recs = [
        _record(1, cs["p_hi"], second=cs["p_go"], kind="pairwise", choice="first"),
        _record(2, cs["p_hi"], second=cs["p_hello"], kind="pairwise", choice="second"),
        _record(3, cs["p_hi"], second=cs["p_hello"], kind="pairwise", choice="tie"),
    ]
    pairs = pairwise_pairs(recs, _by_id(cs))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(P, "Hi!", "Go away."), (P, "Hello there.", "Hi!")]


def test_thumbs_pair_up_with_down_of_the_same_prompt_by_net_vote(cs: dict[str, CompletionRecord]) -> None:
    recs = [
        _record(1, cs["p_hi"], kind="thumbs", thumb_up=True),
        _record(2, cs["p_hello"], kind="thumbs", thumb_up=True, rater="a"),
        _record(3, cs["p_hello"], kind="thumbs", thumb_up=False, rater="b"),  # net 0: no verdict
        _record(4, cs["p_go"], kind="thumbs", thumb_up=False),
        _record(5, cs["p_go"], kind="thumbs", thumb_up=True, rater="x", superseded=True),  # ignored
        _record(6, cs["q_bye"], kind="thumbs", thumb_up=True),  # another prompt: not paired with P's
        _record(7, cs["q_meh"], kind="thumbs", thumb_up=False),
    ]
    pairs = thumbs_pairs(recs, _by_id(cs))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(P, "Hi!", "Go away."), (Q, "Bye!", "Whatever.")]
    assert all(p.source == "thumbs" for p in pairs)


def test_thumbs_pairs_are_capped_per_prompt(cs: dict[str, CompletionRecord]) -> None:
    recs = [
        _record(1, cs["p_hi"], kind="thumbs", thumb_up=True),
        _record(2, cs["p_hello"], kind="thumbs", thumb_up=True),
        _record(3, cs["p_go"], kind="thumbs", thumb_up=False),
    ]
    assert len(thumbs_pairs(recs, _by_id(cs))) == 2
    assert [p.chosen for p in thumbs_pairs(recs, _by_id(cs), max_pairs_per_prompt=1)] == ["Hi!"]


def test_corrections_are_chosen_over_the_original(cs: dict[str, CompletionRecord]) -> None:
    recs = [
        _record(1, cs["p_go"], kind="correction", corrected_text="Hello, nice to meet you."),
        _record(2, cs["p_hi"], kind="correction", corrected_text=" Hi! "),  # no real edit
    ]
    (pair,) = correction_pairs(recs, _by_id(cs))
    assert (pair.prompt, pair.chosen, pair.rejected, pair.chosen_completion_id) == (
        P, "Hello, nice to meet you.", "Go away.", None,
    )  # fmt: skip


def test_unpaired_and_ratings_skip_superseded_feedback(cs: dict[str, CompletionRecord]) -> None:
    recs = [
        _record(1, cs["p_hi"], kind="thumbs", thumb_up=False, superseded=True),
        _record(2, cs["p_hi"], kind="thumbs", thumb_up=True),
        _record(3, cs["q_bye"], kind="rating", rating=2, superseded=True),
        _record(4, cs["q_bye"], kind="rating", rating=4),
        _record(5, cs["q_bye"], kind="comment", comment_text="nice"),
    ]
    assert [e.to_json() for e in unpaired_examples(recs, _by_id(cs))] == [
        {"prompt": P, "completion": "Hi!", "label": True}
    ]
    assert [e.to_json() for e in rated_examples(recs, _by_id(cs))] == [{"prompt": Q, "completion": "Bye!", "rating": 4}]
    assert preference_pairs(recs, _by_id(cs)) == []


async def test_export_writes_parseable_jsonl_from_the_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    good, bad = make_completion(P, "Hello!"), make_completion(P, "No.")
    pair = make_group(Q, ["Bye now.", "Leave."])
    store.write_completions([good, bad, *pair])
    service = FeedbackService(store, Metrics())
    service.start()
    for event in [
        FeedbackEvent(rater_id="u", kind="thumbs", completion_id=good.completion_id, thumb_up=True),
        FeedbackEvent(rater_id="u", kind="thumbs", completion_id=bad.completion_id, thumb_up=True),
        FeedbackEvent(rater_id="u", kind="thumbs", completion_id=bad.completion_id, thumb_up=False),  # changes mind
        FeedbackEvent(rater_id="u", kind="pairwise", group_id=pair[0].group_id, choice="first"),
        FeedbackEvent(rater_id="u", kind="correction", completion_id=bad.completion_id, corrected_text="Hi, sure."),
        FeedbackEvent(rater_id="u", kind="rating", completion_id=good.completion_id, rating=5),
    ]:
        await service.submit(event)
    await service.close()

    def rows(kind: str) -> list[dict[str, object]]:
        out = io.StringIO()
        n = export(store, kind, out)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert n == len(lines)
        return lines

    assert rows("pairs") == [
        {"prompt": Q, "chosen": "Bye now.", "rejected": "Leave."},
        {"prompt": P, "chosen": "Hello!", "rejected": "No."},
        {"prompt": P, "chosen": "Hi, sure.", "rejected": "No."},
    ]
    assert rows("unpaired") == [
        {"prompt": P, "completion": "Hello!", "label": True},
        {"prompt": P, "completion": "No.", "label": False},
    ]
    assert rows("ratings") == [{"prompt": P, "completion": "Hello!", "rating": 5}]
    with pytest.raises(ValueError, match="pairs, unpaired, ratings"):
        export(store, "triples", io.StringIO())
    with pytest.raises(ValueError, match="jsonl"):
        export(store, "pairs", io.StringIO(), format="csv")
    store.close()
