"""Feedback per adapter version, for the admin API and the canary monitor (SQLAlchemy Core reads).

Only current judgements count: a thumbs or rating a rater later replaced is history, not evidence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from sqlalchemy import ColumnElement, Connection, FromClause, and_, func, or_, select

from ..domain import BASE
from .base import CanaryEvidence, VersionFeedback
from .schema import completions, feedback

Arm = tuple[str, str]  # (adapter name, adapter version) that served a completion

_first = completions.alias("first_completion")
_second = completions.alias("second_completion")


def version_feedback(conn: Connection, adapter_name: str) -> dict[str, VersionFeedback]:
    f, c = feedback.c, completions.c
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    judged = (
        select(c.adapter_version, f.kind, f.thumb_up, func.count(), func.coalesce(func.sum(f.rating), 0))
        .join_from(feedback, completions, f.completion_id == c.completion_id)
        .where(c.adapter_name == adapter_name, f.kind.in_(["thumbs", "rating"]), f.superseded_by.is_(None))
        .group_by(c.adapter_version, f.kind, f.thumb_up)
    )
    for version, kind, thumb_up, count, rating_sum in conn.execute(judged):
        if kind == "thumbs":
            totals[version]["thumbs_up" if thumb_up else "thumbs_down"] += count
        else:
            totals[version]["ratings"] += count
            totals[version]["rating_sum"] += rating_sum
    either = or_(_first.c.adapter_name == adapter_name, _second.c.adapter_name == adapter_name)
    for winner, loser in _pairwise_outcomes(conn, either):
        if winner[0] == adapter_name:
            totals[winner[1]]["pairwise_wins"] += 1
        if loser[0] == adapter_name:
            totals[loser[1]]["pairwise_losses"] += 1
    return {version: VersionFeedback(**counts) for version, counts in totals.items()}


def canary_evidence(
    conn: Connection, adapter_name: str, canary_version: str, stable_version: str, since: float
) -> CanaryEvidence:
    f, c = feedback.c, completions.c
    canary: Arm = (adapter_name, canary_version)
    stable: Arm = (adapter_name, stable_version) if stable_version else (BASE, BASE)

    def thumbs(arm: Arm) -> list[tuple[float, bool]]:
        query = (
            select(c.created_at, f.thumb_up)
            .join_from(feedback, completions, f.completion_id == c.completion_id)
            .where(f.kind == "thumbs", f.superseded_by.is_(None), _served_by(completions, arm), c.created_at >= since)
            .order_by(c.created_at, f.seq)
        )
        return [(float(at), bool(up)) for at, up in conn.execute(query)]

    between = and_(
        _first.c.created_at >= since,
        _second.c.created_at >= since,
        or_(
            and_(_served_by(_first, canary), _served_by(_second, stable)),
            and_(_served_by(_first, stable), _served_by(_second, canary)),
        ),
    )
    head_to_head = [winner == canary for winner, _ in _pairwise_outcomes(conn, between)]
    return CanaryEvidence(thumbs(canary), thumbs(stable), head_to_head)


def _served_by(table: FromClause, arm: Arm) -> ColumnElement[bool]:
    return and_(table.c.adapter_name == arm[0], table.c.adapter_version == arm[1])


def _pairwise_outcomes(conn: Connection, where: ColumnElement[bool]) -> Iterator[tuple[Arm, Arm]]:
    """(winner's arm, loser's arm) of each current, non-tie pairwise choice matching `where`, in order."""
    f = feedback.c
    query = (
        select(
            _first.c.adapter_name,
            _first.c.adapter_version,
            _second.c.adapter_name,
            _second.c.adapter_version,
            f.choice,
        )  # fmt: skip
        .join_from(feedback, _first, f.completion_id == _first.c.completion_id)
        .join(_second, f.second_completion_id == _second.c.completion_id)
        .where(f.kind == "pairwise", f.choice != "tie", f.superseded_by.is_(None), where)
        .order_by(f.seq)
    )
    for first_name, first_version, second_name, second_version, choice in conn.execute(query):
        first, second = (first_name, first_version), (second_name, second_version)
        yield (first, second) if choice == "first" else (second, first)
