"""The reward model's gate: pure functions over held-out scores, and the decision.

A reward model is published only if it ranks held-out pairs as well as `reward_min_accuracy`
and better than a length-only baseline (the longer reply wins, or the shorter, whichever fits
the training pairs): a model that learned only length would hand PPO a reward to hack. Where
held-out thumbs and ratings exist, their AUC and rank correlation must reach their thresholds
too; a high correlation of reward with length is warned about.

As in the policy's gate (`gate.py`), a floor fails only when the held-out evidence puts the
figure below it beyond sampling noise (its one-sided 95% upper bound is below the floor): a
512-event log holds out some 35 thumbs, on which the same model's AUC moved from 0.59 to 0.74
between two logs of the same users, so a point estimate against 0.6 refused good models by chance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import RewardConfig
from .gate import GateResult, auc_upper, wilson_upper

log = logging.getLogger(__name__)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen reply scores strictly higher; 0 with no pairs."""
    if not chosen:
        return 0.0
    return sum(1 for c, r in zip(chosen, rejected, strict=True) if c > r) / len(chosen)


def length_baseline_accuracy(train: Sequence[tuple[int, int]], heldout: Sequence[tuple[int, int]]) -> float:
    """Held-out accuracy of "the longer reply wins" (or "the shorter", if that fits `train`
    better), on (chosen length, rejected length) pairs; equal lengths count as misses."""
    longer = pairwise_accuracy([float(c) for c, _ in train], [float(r) for _, r in train])
    shorter = pairwise_accuracy([float(-c) for c, _ in train], [float(-r) for _, r in train])
    sign = 1.0 if longer >= shorter else -1.0
    return pairwise_accuracy([sign * c for c, _ in heldout], [sign * r for _, r in heldout])


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant or there are fewer than 2 points."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    return pearson(ranks(xs), ranks(ys))


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve (the chance a random positive outscores a random negative, ties
    half); None without both classes."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    r = ranks(list(scores))
    pos_rank_sum = sum(rk for rk, p in zip(r, positive, strict=True) if p)
    return (pos_rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def spearman_upper(rho: float, n: int, z: float = 1.645) -> float:
    """One-sided upper confidence bound (95% for z = 1.645) of a Spearman correlation over n
    points: Fisher's z-transform with the standard error sqrt(1.06 / (n - 3)) of Fieller, Hartley
    and Pearson (1957); 1 with fewer than 4 points."""
    if math.isnan(rho):
        return rho  # a broken score fails the floor, as the point estimate did
    if n < 4:
        return 1.0
    clipped = max(-0.999999, min(0.999999, rho))
    return math.tanh(math.atanh(clipped) + z * math.sqrt(1.06 / (n - 3)))


@dataclass
class RewardGateMetrics:
    heldout_pairs: int
    accuracy: float
    length_baseline_accuracy: float
    margin: float  # mean chosen - rejected reward on held-out pairs
    thumbs_auc: float | None
    rating_spearman: float | None
    length_correlation: float
    reward_mean: float  # over training completions, for normalising the reward in PPO
    reward_std: float
    heldout_thumbs_up: int  # the counts the bounds are taken over: no default, or a forgotten
    heldout_thumbs_down: int  # count would bound over nothing and pass every floor
    heldout_ratings: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_reward(m: RewardGateMetrics, cfg: RewardConfig) -> GateResult:
    """Each check runs on the held-out evidence there is: pairs, thumbs of both kinds, ratings. A
    deployment whose users leave only thumbs is gated on thumbs AUC alone; with no held-out
    evidence of any kind the model is not published."""
    failed: list[tuple[str, str]] = []
    if m.heldout_pairs > 0:
        if not (upper := wilson_upper(m.accuracy, m.heldout_pairs)) >= cfg.reward_min_accuracy:
            failed.append(("accuracy", f"held-out pairwise accuracy {m.accuracy:.3f} over {m.heldout_pairs} pairs "
                                       f"(95% upper bound {upper:.3f}) < reward_min_accuracy "
                                       f"{cfg.reward_min_accuracy:.3f}"))  # fmt: skip
        if not m.accuracy > m.length_baseline_accuracy:
            failed.append(("length_baseline", f"held-out accuracy {m.accuracy:.3f} does not beat the length-only "
                                              f"baseline's {m.length_baseline_accuracy:.3f}"))  # fmt: skip
    if m.thumbs_auc is not None:
        upper = auc_upper(m.thumbs_auc, m.heldout_thumbs_up, m.heldout_thumbs_down)
        if not upper >= cfg.reward_min_thumbs_auc:
            failed.append(("thumbs_auc", f"held-out thumbs AUC {m.thumbs_auc:.3f} over {m.heldout_thumbs_up} up and "
                                         f"{m.heldout_thumbs_down} down (95% upper bound {upper:.3f}) < "
                                         f"reward_min_thumbs_auc {cfg.reward_min_thumbs_auc:.3f}"))  # fmt: skip
    if m.rating_spearman is not None:
        upper = spearman_upper(m.rating_spearman, m.heldout_ratings)
        if not upper >= cfg.reward_min_rating_spearman:
            failed.append(("rating_spearman", f"held-out rating rank correlation {m.rating_spearman:.3f} over "
                           f"{m.heldout_ratings} ratings (95% upper bound {upper:.3f}) < "
                           f"reward_min_rating_spearman {cfg.reward_min_rating_spearman:.3f}"))  # fmt: skip
    if m.heldout_pairs == 0 and m.thumbs_auc is None and m.rating_spearman is None:
        failed.append(("evidence", "no held-out pairs, thumbs of both kinds or ratings to check the reward model on"))
    if abs(m.length_correlation) > cfg.reward_max_length_correlation:
        log.warning(
            "reward model: reward correlates with completion length at %.2f (> %.2f): PPO may learn to pad or cut "
            "replies instead of improving them",
            m.length_correlation,
            cfg.reward_max_length_correlation,
        )
    return GateResult(passed=not failed, failures=[f for _, f in failed], failed_checks=[c for c, _ in failed])
