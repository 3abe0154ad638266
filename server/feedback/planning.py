"""What each event of a feedback batch does, decided from what the store holds: which completions it
is about, whether it is a retry, a conflict or new, and which earlier judgement it supersedes.
Pure: the writer reads the store, hands the rows here, and writes what comes back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import TuneloopError
from ..store.base import CompletionRef, StoredEventKey
from .events import EventIdConflict, FeedbackAck, FeedbackEvent, FeedbackRecord, InvalidFeedback, UnknownCompletion


def resolve_targets(
    event: FeedbackEvent,
    refs: Mapping[str, CompletionRef],
    groups: Mapping[str, Sequence[CompletionRef]],
) -> tuple[CompletionRef, CompletionRef | None]:
    """The completion(s) an event is about, checked against the store's rows.

    Raises UnknownCompletion for an id or group the store does not hold, InvalidFeedback for a
    pairwise choice over a group of more than two or over completions of different prompts.
    """
    if event.kind != "pairwise":
        return _known(refs, event.completion_id, "completion_id"), None
    if event.group_id:
        members = groups.get(event.group_id)
        if not members:
            raise UnknownCompletion(f"pairwise.group_id {event.group_id!r} is not a known group of completions")
        if len(members) != 2:
            raise InvalidFeedback(
                "group_not_pair",
                f"pairwise.group_id {event.group_id!r} has {len(members)} candidates; name the two compared "
                "completions with first_completion_id and second_completion_id",
            )
        return members[0], members[1]
    first = _known(refs, event.completion_id, "pairwise.first_completion_id")
    second = _known(refs, event.second_completion_id, "pairwise.second_completion_id")
    if first.prompt_sha256 != second.prompt_sha256:
        raise InvalidFeedback(
            "different_prompts",
            f"pairwise: completions {first.completion_id!r} and {second.completion_id!r} answer different "
            "prompts; a pairwise choice compares two answers to the same prompt",
        )
    return first, second


def _known(refs: Mapping[str, CompletionRef], completion_id: str, field_name: str) -> CompletionRef:
    ref = refs.get(completion_id)
    if ref is None:
        raise UnknownCompletion(
            f"{field_name} {completion_id!r} is not a known completion: it was not served by this deployment, or "
            "its server stopped in the moment between answering and logging it (docs/deploy.md, 'Durability "
            "window'); feedback on it cannot be stored"
        )
    return ref


_Outcome = tuple[int, bool] | FeedbackAck | TuneloopError  # (index into new records, duplicate) | ...


@dataclass
class BatchPlan:
    """What each event of one batch does, decided from what the store holds (no I/O here).

    Events are taken in arrival order, so within a batch a retry of an earlier event is a duplicate
    and a newer thumbs supersedes an older one exactly as if they had come in separate batches.
    """

    refs: Mapping[str, CompletionRef]
    groups: Mapping[str, Sequence[CompletionRef]]
    stored: Mapping[str, StoredEventKey]
    current: dict[str, str]  # judgement key -> current event id, updated as events supersede
    now: float
    records: list[FeedbackRecord] = field(default_factory=list)
    targets: list[tuple[CompletionRef, CompletionRef | None]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (older stored, newer) event ids
    outcomes: list[_Outcome] = field(default_factory=list)
    _new_ids: dict[str, int] = field(default_factory=dict)

    def add(self, event: FeedbackEvent) -> None:
        try:
            self.outcomes.append(self._decide(event))
        except TuneloopError as exc:
            self.outcomes.append(exc)

    def _decide(self, event: FeedbackEvent) -> _Outcome:
        content = event.content_sha256
        if (old := self.stored.get(event.event_id)) is not None:
            _check_same_content(event.event_id, old.content_sha256, content)
            return FeedbackAck(event.event_id, True, old.seq, old.supersedes or "")
        if (i := self._new_ids.get(event.event_id)) is not None:
            _check_same_content(event.event_id, self.records[i].event.content_sha256, content)
            return (i, True)
        first, second = resolve_targets(event, self.refs, self.groups)
        supersedes = None
        if (key := event.judgement_key) is not None:
            supersedes = self.current.get(key)
            self.current[key] = event.event_id
            if supersedes in self._new_ids:  # superseded within this batch: insert it already linked
                j = self._new_ids[supersedes]
                self.records[j] = replace(self.records[j], superseded_by=event.event_id)
            elif supersedes is not None:
                self.links.append((supersedes, event.event_id))
        self._new_ids[event.event_id] = len(self.records)
        self.records.append(
            FeedbackRecord(
                seq=0,
                event=event,
                completion_id=first.completion_id,
                second_completion_id=second.completion_id if second else None,
                prompt_sha256=first.prompt_sha256,
                created_at=self.now,
                supersedes=supersedes,
            )
        )
        self.targets.append((first, second))
        return (len(self.records) - 1, False)

    def acks(self, seqs: Sequence[int]) -> list[FeedbackAck | TuneloopError]:
        """The answer to each event, once the new records got their sequence numbers."""
        out: list[FeedbackAck | TuneloopError] = []
        for o in self.outcomes:
            if isinstance(o, tuple):
                rec = self.records[o[0]]
                out.append(FeedbackAck(rec.event.event_id, o[1], seqs[o[0]], rec.supersedes or ""))
            else:
                out.append(o)
        return out


def _check_same_content(event_id: str, stored_sha: str, sent_sha: str) -> None:
    if stored_sha != sent_sha:
        raise EventIdConflict(
            f"event_id {event_id!r} was already used for a different event; use a new id for new feedback"
        )


