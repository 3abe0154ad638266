"""Feedback -> training data: pure functions over `CompletionRow` / `FeedbackRow`.

This module is the single source of training data: the DPO trainer, the reward model and
`tuneloop feedback export` all read pairs and pointwise examples from here, so what a user exports
is what the trainer trains on. It imports neither torch nor a database.

Pairs (`build_dataset`):

Four sources make pairs, all within one prompt (DPO compares two answers to the same context):
  pairwise    an explicit choice between two completions (ties make no pair)
  correction  the rater's corrected text (chosen) against the completion it corrects
  rating      two completions whose mean ratings differ by at least `min_rating_gap`
  thumbs      a net-thumbs-up completion against a net-thumbs-down one

Then: duplicates (same prompt, same two texts) are kept once, a pair contradicted by another
(same texts, opposite order) is dropped with it, identical texts are ties and dropped, each rater
is capped at `max_pairs_per_rater`, and prompts are split into train / held-out by a salted hash,
so a prompt is on the same side in every run and held-out prompts never leak into training.

Every pair keeps the event ids it came from; `PreferenceDataset.snapshot()` records them per pair,
so `rebuild_dataset` recreates the exact pairs of a past run from the store.

Pointwise examples (`build_pointwise`): one per current thumbs or rating event (a completion judged
by several raters gives several), capped per rater like pairs and split by the same prompt hash, so
a prompt held out of the pairs is held out of the pointwise examples too. Corrections are pairs only:
they say which of two texts is better, not how good either is. KTO reads the pointwise examples as
desirable or undesirable (`kto_label`): thumbs, and optionally ratings of 4-5 against 1-2.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .config import DatasetConfig
from .rows import CORRECTION, PAIRWISE, RATING, THUMBS, CompletionRow, FeedbackRow, PreferencePair

# Earlier sources win when two make the same pair: an explicit choice is the strongest signal.
SOURCE_PRIORITY = {PAIRWISE: 0, CORRECTION: 1, RATING: 2, THUMBS: 3}


@dataclass
class PreferenceDataset:
    train: list[PreferencePair]
    heldout: list[PreferencePair]
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count

    @property
    def pairs(self) -> list[PreferencePair]:
        return [*self.train, *self.heldout]

    @property
    def event_ids(self) -> list[str]:
        """Every feedback event id this dataset uses, sorted."""
        return sorted({e for p in self.pairs for e in p.event_ids})

    def snapshot(self) -> dict[str, Any]:
        """What a run records about its data: per pair, the events and completions it came from."""
        records = {
            "train": [p.to_record() for p in self.train],
            "heldout": [p.to_record() for p in self.heldout],
        }
        ids = self.event_ids
        return {
            "event_ids": ids,
            "digest": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
            "pairs": records,
            "train_pairs": len(self.train),
            "heldout_pairs": len(self.heldout),
            "dropped": dict(sorted(self.dropped.items())),
        }


# -- sources ------------------------------------------------------------------------------------
def usable_feedback(feedback: Iterable[FeedbackRow]) -> list[FeedbackRow]:
    """Superseded events are never used."""
    return [f for f in feedback if not f.superseded]


def pairwise_pairs(
    feedback: Sequence[FeedbackRow], completions: Mapping[str, CompletionRow], dropped: Counter[str]
) -> list[PreferencePair]:
    pairs = []
    for f in feedback:
        if f.kind != PAIRWISE:
            continue
        a, b = completions.get(f.completion_id), completions.get(f.other_completion_id)
        if a is None or b is None:
            dropped["pairwise_unknown_completion"] += 1
        elif a.completion_id == b.completion_id:
            dropped["pairwise_same_completion"] += 1
        elif not f.choice:
            dropped["pairwise_tie"] += 1
        elif f.choice not in (a.completion_id, b.completion_id):
            dropped["pairwise_bad_choice"] += 1
        elif a.prompt_hash != b.prompt_hash:
            dropped["pairwise_different_prompts"] += 1
        else:
            chosen, rejected = (a, b) if f.choice == a.completion_id else (b, a)
            pairs.append(_pair(chosen, rejected, PAIRWISE, [f]))
    return pairs


def correction_pairs(
    feedback: Sequence[FeedbackRow], completions: Mapping[str, CompletionRow], dropped: Counter[str]
) -> list[PreferencePair]:
    pairs = []
    for f in feedback:
        if f.kind != CORRECTION:
            continue
        original = completions.get(f.completion_id)
        if original is None:
            dropped["correction_unknown_completion"] += 1
        elif not f.text.strip():
            dropped["correction_empty"] += 1
        elif f.text.strip() == original.text.strip():
            dropped["correction_unchanged"] += 1
        else:
            pairs.append(_correction_pair(original, f))
    return pairs


def _correction_pair(original: CompletionRow, correction: FeedbackRow) -> PreferencePair:
    """The corrected text (chosen, no completion of its own) over the completion it corrects."""
    return PreferencePair(
        prompt_text=original.prompt_text,
        prompt_hash=original.prompt_hash,
        chosen_text=correction.text,
        rejected_text=original.text,
        source=CORRECTION,
        event_ids=(correction.event_id,),
        rater_ids=(correction.rater_id,),
        chosen_completion_id="",
        rejected_completion_id=original.completion_id,
        created_at=correction.created_at,
    )


def thumbs_pairs(
    feedback: Sequence[FeedbackRow], completions: Mapping[str, CompletionRow], dropped: Counter[str]
) -> list[PreferencePair]:
    """Per completion, thumbs are netted across raters (ties make it neither up nor down); each
    net-up completion pairs with each net-down completion of the same prompt. A pair uses the
    events on the winning side of each completion's vote."""
    votes: dict[str, list[FeedbackRow]] = defaultdict(list)
    for f in feedback:
        if f.kind != THUMBS:
            continue
        if f.completion_id not in completions:
            dropped["thumbs_unknown_completion"] += 1
        elif f.value is None or f.value == 0:
            dropped["thumbs_bad_value"] += 1
        else:
            votes[f.completion_id].append(f)
    up: dict[str, list[tuple[str, list[FeedbackRow]]]] = defaultdict(list)
    down: dict[str, list[tuple[str, list[FeedbackRow]]]] = defaultdict(list)
    for cid, events in sorted(votes.items()):
        net = sum(1 if (e.value or 0) > 0 else -1 for e in events)
        if net == 0:
            dropped["thumbs_tied_completion"] += len(events)
            continue
        winning = [e for e in events if ((e.value or 0) > 0) == (net > 0)]
        dropped["thumbs_outvoted"] += len(events) - len(winning)
        (up if net > 0 else down)[completions[cid].prompt_hash].append((cid, winning))
    pairs = []
    for ph, ups in up.items():
        for cid_up, ev_up in ups:
            for cid_down, ev_down in down.get(ph, []):
                pairs.append(_pair(completions[cid_up], completions[cid_down], THUMBS, [*ev_up, *ev_down]))
    return pairs


def rating_pairs(
    feedback: Sequence[FeedbackRow],
    completions: Mapping[str, CompletionRow],
    min_gap: float,
    dropped: Counter[str],
) -> list[PreferencePair]:
    """Completions of the same prompt whose mean ratings differ by >= `min_gap`."""
    ratings: dict[str, list[FeedbackRow]] = defaultdict(list)
    for f in feedback:
        if f.kind != RATING:
            continue
        if f.completion_id not in completions:
            dropped["rating_unknown_completion"] += 1
        elif f.value is None or not 1 <= f.value <= 5:
            dropped["rating_bad_value"] += 1
        else:
            ratings[f.completion_id].append(f)
    by_prompt: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for cid, events in sorted(ratings.items()):
        mean = sum(float(e.value or 0) for e in events) / len(events)
        by_prompt[completions[cid].prompt_hash].append((cid, mean))
    pairs = []
    for rated in by_prompt.values():
        for cid_a, mean_a in rated:
            for cid_b, mean_b in rated:
                if cid_a != cid_b and mean_a - mean_b >= min_gap:
                    pairs.append(
                        _pair(completions[cid_a], completions[cid_b], RATING, [*ratings[cid_a], *ratings[cid_b]])
                    )
    return pairs


def _pair(chosen: CompletionRow, rejected: CompletionRow, source: str, events: list[FeedbackRow]) -> PreferencePair:
    events = sorted(events, key=lambda e: e.event_id)
    return PreferencePair(
        prompt_text=chosen.prompt_text,
        prompt_hash=chosen.prompt_hash,
        chosen_text=chosen.text,
        rejected_text=rejected.text,
        source=source,
        event_ids=tuple(e.event_id for e in events),
        rater_ids=tuple(sorted({e.rater_id for e in events})),
        chosen_completion_id=chosen.completion_id,
        rejected_completion_id=rejected.completion_id,
        created_at=max((e.created_at for e in events), default=0.0),
    )


# -- cleaning -----------------------------------------------------------------------------------
def _order(p: PreferencePair) -> tuple[Any, ...]:
    return (SOURCE_PRIORITY[p.source], p.created_at, p.event_ids)


def dedupe(pairs: Iterable[PreferencePair], dropped: Counter[str]) -> list[PreferencePair]:
    """Drop ties (identical texts), keep one pair per content key (highest-priority source first),
    and drop both sides of a contradiction (the same two texts preferred both ways)."""
    kept: dict[tuple[str, str, str], PreferencePair] = {}
    for p in sorted(pairs, key=_order):
        if p.chosen_text.strip() == p.rejected_text.strip():
            dropped["tie_identical_texts"] += 1
        elif p.key in kept:
            dropped["duplicate"] += 1
        else:
            kept[p.key] = p
    result = []
    for key, p in kept.items():
        if (key[0], key[2], key[1]) in kept:
            dropped["contradicted"] += 1
        else:
            result.append(p)
    return result


T = TypeVar("T")


def _cap_in_order(items: Iterable[T], raters: Callable[[T], Sequence[str]], cap: int, dropped: Counter[str]) -> list[T]:
    """Keep an item (visited in the given order) only while every rater behind it has fewer than
    `cap` kept items."""
    counts: Counter[str] = Counter()
    kept = []
    for item in items:
        if any(counts[r] >= cap for r in raters(item)):
            dropped["rater_cap"] += 1
            continue
        counts.update(raters(item))
        kept.append(item)
    return kept


def cap_per_rater(pairs: Iterable[PreferencePair], cap: int, dropped: Counter[str]) -> list[PreferencePair]:
    """Keep a pair only while every rater behind it has fewer than `cap` kept pairs.

    Pairs are visited oldest first, so a rater's earliest feedback counts and a burst of later
    votes from one account cannot crowd out everyone else.
    """
    ordered = sorted(pairs, key=lambda q: (q.created_at, SOURCE_PRIORITY[q.source], q.event_ids))
    return _cap_in_order(ordered, lambda p: p.rater_ids, cap, dropped)


def heldout_score(prompt_hash_: str, salt: str) -> float:
    """A stable number in [0, 1) per prompt; prompts under the held-out fraction are held out."""
    digest = hashlib.sha256(f"{salt}:{prompt_hash_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_prompts(prompt_hashes: Iterable[str], fraction: float, salt: str) -> set[str]:
    """The held-out prompts among `prompt_hashes`. With two or more prompts each side gets at least
    one prompt, so a small dataset still has something to evaluate on."""
    prompts = sorted(set(prompt_hashes), key=lambda h: heldout_score(h, salt))
    held = {h for h in prompts if heldout_score(h, salt) < fraction}
    if len(prompts) >= 2:
        if not held:
            held = {prompts[0]}
        elif len(held) == len(prompts):
            held.discard(prompts[-1])
    return held


class _ByPrompt(Protocol):
    @property
    def prompt_hash(self) -> str: ...


P = TypeVar("P", bound=_ByPrompt)


def split_by_prompt(items: Sequence[P], fraction: float, salt: str) -> tuple[list[P], list[P]]:
    """Train / held-out by prompt (see `heldout_prompts`): pairs and pointwise examples alike."""
    held = heldout_prompts({p.prompt_hash for p in items}, fraction, salt)
    train = [p for p in items if p.prompt_hash not in held]
    heldout = [p for p in items if p.prompt_hash in held]
    return train, heldout


# -- pointwise examples ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PointwiseExample:
    """One judgement of one completion: `kind` thumbs (`value` +1 up / -1 down) or rating (1..5)."""

    prompt_text: str
    prompt_hash: str
    completion_text: str
    kind: str
    value: float
    event_id: str
    rater_id: str
    completion_id: str
    created_at: float = 0.0


@dataclass
class PointwiseDataset:
    train: list[PointwiseExample]
    heldout: list[PointwiseExample]
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count

    @property
    def examples(self) -> list[PointwiseExample]:
        return [*self.train, *self.heldout]

    def of_kind(self, kind: str, split: str = "train") -> list[PointwiseExample]:
        return [e for e in (self.train if split == "train" else self.heldout) if e.kind == kind]


def pointwise_examples(
    feedback: Sequence[FeedbackRow], completions: Mapping[str, CompletionRow], dropped: Counter[str]
) -> list[PointwiseExample]:
    """Valid current thumbs (+-1) and ratings (1..5) on known completions, oldest first."""
    out = []
    for f in sorted(feedback, key=lambda e: (e.created_at, e.event_id)):
        if f.kind not in (THUMBS, RATING):
            continue
        c = completions.get(f.completion_id)
        ok = f.value is not None and (f.value in (1, -1) if f.kind == THUMBS else 1 <= f.value <= 5)
        if c is None:
            dropped[f"{f.kind}_unknown_completion"] += 1
        elif not ok:
            dropped[f"{f.kind}_bad_value"] += 1
        else:
            out.append(PointwiseExample(c.prompt_text, c.prompt_hash, c.text, f.kind, float(f.value or 0),
                                        f.event_id, f.rater_id, c.completion_id, f.created_at))  # fmt: skip
    return out


def _prepare(
    completions: Iterable[CompletionRow], feedback: Iterable[FeedbackRow]
) -> tuple[dict[str, CompletionRow], list[FeedbackRow], Counter[str]]:
    """Completions by id, the usable feedback, and the drop counter (superseded events counted)."""
    all_rows = list(feedback)
    rows = usable_feedback(all_rows)
    dropped: Counter[str] = Counter()
    dropped["superseded"] += len(all_rows) - len(rows)
    return {c.completion_id: c for c in completions}, rows, dropped


def build_pointwise(
    completions: Iterable[CompletionRow], feedback: Iterable[FeedbackRow], config: DatasetConfig
) -> PointwiseDataset:
    """Thumbs and ratings as pointwise examples, capped per rater and split by prompt."""
    by_id, rows, dropped = _prepare(completions, feedback)
    kinds = {k for k, on in ((THUMBS, config.use_thumbs), (RATING, config.use_ratings)) if on}
    examples = [e for e in pointwise_examples(rows, by_id, dropped) if e.kind in kinds]
    # `examples` are oldest first, as pairs are for their cap.
    kept = _cap_in_order(examples, lambda e: (e.rater_id,), config.max_pairs_per_rater, dropped)
    train, heldout = split_by_prompt(kept, config.heldout_fraction, config.split_salt)
    return PointwiseDataset(train=train, heldout=heldout, dropped=+dropped)


# -- KTO's labels -------------------------------------------------------------------------------
# A rating of 4 or 5 says the reply was good, 1 or 2 that it was bad; a 3 says neither.
DESIRABLE_RATING, UNDESIRABLE_RATING = 4.0, 2.0


def kto_label(example: PointwiseExample, ratings_as_labels: bool = True) -> bool | None:
    """Desirable (True), undesirable (False) or neither (None), for KTO (arXiv 2402.01306).

    A thumb up is desirable and a thumb down undesirable. With `ratings_as_labels`, a rating of at
    least DESIRABLE_RATING is desirable and one of at most UNDESIRABLE_RATING undesirable; a middle
    rating, or any rating without it, is no label.
    """
    if example.kind == THUMBS:
        return example.value > 0
    if example.kind == RATING and ratings_as_labels:
        if example.value >= DESIRABLE_RATING:
            return True
        if example.value <= UNDESIRABLE_RATING:
            return False
    return None


def kto_examples(pointwise: PointwiseDataset, ratings_as_labels: bool = True) -> PointwiseDataset:
    """The thumbs and ratings KTO learns from (those `kto_label` labels), split as given; the rest
    are counted in `dropped` by why."""
    dropped = Counter(pointwise.dropped)
    for e in pointwise.examples:
        if kto_label(e, ratings_as_labels) is None:
            dropped["kto_middle_rating" if ratings_as_labels else "kto_ratings_not_labels"] += 1

    def keep(examples: list[PointwiseExample]) -> list[PointwiseExample]:
        return [e for e in examples if kto_label(e, ratings_as_labels) is not None]

    return PointwiseDataset(train=keep(pointwise.train), heldout=keep(pointwise.heldout), dropped=+dropped)


# -- the builder --------------------------------------------------------------------------------
def build_dataset(
    completions: Iterable[CompletionRow], feedback: Iterable[FeedbackRow], config: DatasetConfig
) -> PreferenceDataset:
    by_id, rows, dropped = _prepare(completions, feedback)
    pairs: list[PreferencePair] = []
    if config.use_pairwise:
        pairs += pairwise_pairs(rows, by_id, dropped)
    if config.use_corrections:
        pairs += correction_pairs(rows, by_id, dropped)
    if config.use_ratings:
        pairs += rating_pairs(rows, by_id, config.min_rating_gap, dropped)
    if config.use_thumbs:
        pairs += thumbs_pairs(rows, by_id, dropped)
    pairs = cap_per_rater(dedupe(pairs, dropped), config.max_pairs_per_rater, dropped)
    pairs.sort(key=lambda p: (p.prompt_hash, _order(p)))
    train, heldout = split_by_prompt(pairs, config.heldout_fraction, config.split_salt)
    return PreferenceDataset(train=train, heldout=heldout, dropped=+dropped)


def rebuild_dataset(
    snapshot: Mapping[str, Any], completions: Iterable[CompletionRow], feedback: Iterable[FeedbackRow]
) -> PreferenceDataset:
    """The exact pairs a past run used, from its recorded snapshot and the store's rows.

    Raises KeyError naming the first event or completion that is no longer in the store.
    """
    by_id = {c.completion_id: c for c in completions}
    events = {f.event_id: f for f in feedback}

    def make(rec: Mapping[str, Any]) -> PreferencePair:
        evs = [events[e] for e in rec["events"]]
        rejected = by_id[rec["rejected"]]
        if rec["source"] == CORRECTION:
            (f,) = evs
            return _correction_pair(rejected, f)
        return _pair(by_id[rec["chosen"]], rejected, rec["source"], evs)

    pairs = snapshot["pairs"]
    return PreferenceDataset(train=[make(r) for r in pairs["train"]], heldout=[make(r) for r in pairs["heldout"]])


def count_new_pairs(dataset: PreferenceDataset, seen_event_ids: Iterable[str]) -> int:
    """Pairs with at least one feedback event that no earlier run used."""
    seen = set(seen_event_ids)
    return sum(1 for p in dataset.pairs if not seen.issuperset(p.event_ids))


def count_new_examples(
    dataset: PreferenceDataset, pointwise: PointwiseDataset | None, seen_event_ids: Iterable[str]
) -> tuple[int, str]:
    """New pairs, plus new thumbs and ratings when the algorithm learns from them (`pointwise` is
    then given); and what was counted, for the log."""
    seen = set(seen_event_ids)
    new = count_new_pairs(dataset, seen)
    if pointwise is None:
        return new, "pairs"
    return new + sum(1 for e in pointwise.examples if e.event_id not in seen), "pairs, thumbs and ratings"
