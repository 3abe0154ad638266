"""Dataset export: feedback rows -> the common preference-training formats, as JSONL.

- "pairs"    {prompt, chosen, rejected}: the preference format of DPO (arXiv 2305.18290, and TRL's
             "preference" datasets). Built from explicit pairwise choices, from a thumbs-up and a
             thumbs-down completion of the same prompt, and from corrections (the edit is chosen over
             the original).
- "unpaired" {prompt, completion, label}: one thumbs each, label true for up (TRL's "unpaired
             preference" format, as used by KTO).
- "ratings"  {prompt, completion, rating}: one 1-5 rating each, for a reward model.

Superseded thumbs and ratings (a rater changed their mind) are left out everywhere. `prompt` is
the prompt as the model saw it (chat template applied). The builders are pure functions of
feedback records and the completions they refer to; `export` reads those from a store.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal, Protocol, TextIO

from .domain import CompletionRecord
from .feedback import FeedbackRecord
from .store.base import Store

ExportKind = Literal["pairs", "unpaired", "ratings"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("pairs", "unpaired", "ratings")
EXPORT_FORMATS = ("jsonl",)
PairSource = Literal["pairwise", "thumbs", "correction"]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: PairSource
    chosen_completion_id: str | None  # None when the chosen text is a correction
    rejected_completion_id: str

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass(frozen=True)
class LabeledCompletion:
    prompt: str
    completion: str
    label: bool  # True: thumbs up
    completion_id: str

    def to_json(self) -> dict[str, str | bool]:
        return {"prompt": self.prompt, "completion": self.completion, "label": self.label}


@dataclass(frozen=True)
class RatedCompletion:
    prompt: str
    completion: str
    rating: int  # 1-5
    completion_id: str

    def to_json(self) -> dict[str, str | int]:
        return {"prompt": self.prompt, "completion": self.completion, "rating": self.rating}


def current(records: Iterable[FeedbackRecord], kind: str) -> list[FeedbackRecord]:
    """The records of one kind that are not superseded, in sequence order."""
    return sorted((r for r in records if r.kind == kind and r.is_current), key=lambda r: r.seq)


def pairwise_pairs(
    records: Iterable[FeedbackRecord], completions: Mapping[str, CompletionRecord]
) -> list[PreferencePair]:
    """One pair per explicit pairwise choice; ties carry no preference and are skipped."""
    pairs = []
    for r in current(records, "pairwise"):
        if r.event.choice == "tie" or r.second_completion_id is None:
            continue
        first, second = completions[r.completion_id], completions[r.second_completion_id]
        chosen, rejected = (first, second) if r.event.choice == "first" else (second, first)
        pairs.append(_pair(chosen, rejected, "pairwise"))
    return pairs


def thumbs_pairs(
    records: Iterable[FeedbackRecord],
    completions: Mapping[str, CompletionRecord],
    max_pairs_per_prompt: int | None = None,
) -> list[PreferencePair]:
    """Pairs every thumbed-up completion of a prompt with every thumbed-down one of the same prompt.

    A completion's verdict is the sign of (ups - downs) over raters' current thumbs; a tie gives
    no verdict. Pairs with identical texts teach nothing and are skipped. With
    `max_pairs_per_prompt`, the earliest-judged pairs of each prompt are kept.
    """
    net: dict[str, int] = defaultdict(int)  # completion id -> ups - downs, in first-judged order
    prompt_of: dict[str, str] = {}
    for r in current(records, "thumbs"):
        net[r.completion_id] += 1 if r.event.thumb_up else -1
        prompt_of[r.completion_id] = r.prompt_sha256
    by_prompt: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for cid, votes in net.items():
        if votes:
            by_prompt[prompt_of[cid]][0 if votes > 0 else 1].append(cid)
    pairs: list[PreferencePair] = []
    for good, bad in by_prompt.values():
        kept = [
            (completions[g], completions[b])
            for g, b in product(good, bad)
            if completions[g].output_text != completions[b].output_text
        ]
        pairs.extend(_pair(c, r, "thumbs") for c, r in kept[:max_pairs_per_prompt])
    return pairs


def correction_pairs(
    records: Iterable[FeedbackRecord], completions: Mapping[str, CompletionRecord]
) -> list[PreferencePair]:
    """The corrected text chosen over the original completion (a no-op edit is skipped)."""
    pairs: list[PreferencePair] = []
    for r in current(records, "correction"):
        original = completions[r.completion_id]
        text = r.event.corrected_text or ""
        if text.strip() != original.output_text.strip():
            pairs.append(PreferencePair(original.prompt_text, text, original.output_text, "correction", None,
                                        original.completion_id))  # fmt: skip
    return pairs


def preference_pairs(
    records: Sequence[FeedbackRecord], completions: Mapping[str, CompletionRecord]
) -> list[PreferencePair]:
    """All pairs: explicit choices, then thumbs up-vs-down, then corrections."""
    return [
        *pairwise_pairs(records, completions),
        *thumbs_pairs(records, completions),
        *correction_pairs(records, completions),
    ]


def unpaired_examples(
    records: Iterable[FeedbackRecord], completions: Mapping[str, CompletionRecord]
) -> list[LabeledCompletion]:
    """One labelled example per current thumbs (several raters of a completion give several)."""
    return [
        LabeledCompletion(c.prompt_text, c.output_text, bool(r.event.thumb_up), c.completion_id)
        for r, c in _judged(records, "thumbs", completions)
    ]


def rated_examples(
    records: Iterable[FeedbackRecord], completions: Mapping[str, CompletionRecord]
) -> list[RatedCompletion]:
    """One example per current rating."""
    return [
        RatedCompletion(c.prompt_text, c.output_text, int(r.event.rating or 0), c.completion_id)
        for r, c in _judged(records, "rating", completions)
    ]


def _judged(
    records: Iterable[FeedbackRecord], kind: str, completions: Mapping[str, CompletionRecord]
) -> Iterator[tuple[FeedbackRecord, CompletionRecord]]:
    for r in current(records, kind):
        yield r, completions[r.completion_id]


def _pair(chosen: CompletionRecord, rejected: CompletionRecord, source: PairSource) -> PreferencePair:
    return PreferencePair(
        chosen.prompt_text, chosen.output_text, rejected.output_text, source, chosen.completion_id,
        rejected.completion_id,
    )  # fmt: skip


class _JsonRow(Protocol):
    def to_json(self) -> Mapping[str, object]: ...


_Builder = Callable[[Sequence[FeedbackRecord], Mapping[str, CompletionRecord]], Sequence[_JsonRow]]
_BUILDERS: dict[str, _Builder] = {"pairs": preference_pairs, "unpaired": unpaired_examples, "ratings": rated_examples}


def export(store: Store, kind: str, out: TextIO, *, format: str = "jsonl", chunk: int = 500) -> int:
    """Writes the `kind` dataset ("pairs", "unpaired" or "ratings") built from every feedback row
    of `store` to `out`, one JSON object per line; returns the number of rows written.

    Raises ValueError naming the choices for an unknown kind or format.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown export kind {kind!r}; choose one of {', '.join(EXPORT_KINDS)}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    records = list(store.iter_feedback())
    ids = sorted({c for r in records for c in (r.completion_id, r.second_completion_id) if c})
    completions: dict[str, CompletionRecord] = {}
    for i in range(0, len(ids), chunk):
        completions.update(store.get_completions(ids[i : i + chunk]))
    rows = _BUILDERS[kind](records, completions)
    for row in rows:
        out.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
    return len(rows)
