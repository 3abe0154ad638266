"""Dataset export: the trainer's data layer as JSONL, from a real store; and the pointwise examples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from completion_factory import make_completion, make_group

from tuneloop.server.feedback import FeedbackEvent
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.store import open_store
from tuneloop.trainer.config import DatasetConfig
from tuneloop.trainer.dataset import build_dataset, build_pointwise
from tuneloop.trainer.export import export
from tuneloop.trainer.rows import CompletionRow, FeedbackRow
from tuneloop.trainer.source import StoreSource

P, Q = "Greet me.", "Say bye."


def test_pointwise_examples_are_current_valid_thumbs_and_ratings_capped_per_rater() -> None:
    cs = [CompletionRow("a", P, "Hi!"), CompletionRow("b", Q, "Bye!")]
    fb = [
        FeedbackRow("e1", "thumbs", "r1", "a", value=-1, superseded=True, created_at=1),
        FeedbackRow("e2", "thumbs", "r1", "a", value=1, created_at=2),
        FeedbackRow("e3", "rating", "r1", "b", value=4, created_at=3),
        FeedbackRow("e4", "rating", "r2", "b", value=9, created_at=4),  # out of range
        FeedbackRow("e5", "thumbs", "r2", "zzz", value=1, created_at=5),  # unknown completion
        FeedbackRow("e6", "rating", "r1", "a", value=2, created_at=6),  # over r1's cap of 2
        FeedbackRow("e7", "correction", "r3", "a", text="Hello!", created_at=7),  # a pair, not pointwise
    ]
    pw = build_pointwise(cs, fb, DatasetConfig(max_pairs_per_rater=2))
    assert sorted((e.event_id, e.kind, e.value) for e in pw.examples) == [("e2", "thumbs", 1.0), ("e3", "rating", 4.0)]
    assert pw.dropped == {"superseded": 1, "rating_bad_value": 1, "thumbs_unknown_completion": 1, "rater_cap": 1}
    # Two prompts: one on each side, by the same salted hash as pairs.
    assert len(pw.train) == len(pw.heldout) == 1


def test_pointwise_and_pairs_hold_out_the_same_prompts() -> None:
    prompts = [f"prompt {i}" for i in range(20)]
    cs = [CompletionRow(f"{i}{s}", p, f"{s} {i}") for i, p in enumerate(prompts) for s in ("good", "bad")]
    fb = [FeedbackRow(f"e{i}{s}", "thumbs", f"r{i}", f"{i}{s}", value=1 if s == "good" else -1)
          for i in range(20) for s in ("good", "bad")]  # fmt: skip
    cfg = DatasetConfig()
    pairs, pw = build_dataset(cs, fb, cfg), build_pointwise(cs, fb, cfg)
    assert {p.prompt_hash for p in pairs.heldout} == {e.prompt_hash for e in pw.heldout} != set()


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

    completions, feedback = StoreSource(store).load()
    trained = build_dataset(completions, feedback, DatasetConfig())
    # Exactly what the trainer trains on (and holds out), in its order.
    assert rows("pairs") == [
        {"prompt": p.prompt_text, "chosen": p.chosen_text, "rejected": p.rejected_text, "split": split}
        for split, ps in (("train", trained.train), ("heldout", trained.heldout))
        for p in ps
    ]
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows("pairs")) == [
        (P, "Hello!", "No."), (P, "Hi, sure.", "No."), (Q, "Bye now.", "Leave."),
    ]  # fmt: skip
    # What KTO trains on: both thumbs (the later one of a changed mind), and the 5 as desirable.
    assert sorted((r["completion"], r["label"]) for r in rows("unpaired")) == [
        ("Hello!", True), ("Hello!", True), ("No.", False),
    ]  # fmt: skip
    assert [{k: v for k, v in r.items() if k != "split"} for r in rows("ratings")] == [
        {"prompt": P, "completion": "Hello!", "rating": 5}
    ]
    with pytest.raises(ValueError, match="pairs, unpaired, ratings"):
        export(store, "triples", io.StringIO())
    with pytest.raises(ValueError, match="jsonl"):
        export(store, "pairs", io.StringIO(), format="csv")
    store.close()
