"""The canary's sequential test on synthetic feedback streams (worse, equal, better)."""

from __future__ import annotations

import math
import random

import pytest

from tuneloop.server.adapters import canary_bucket
from tuneloop.server.canary import CONTINUE, PROMOTE, ROLL_BACK, CanaryPolicy, discordant_pairs, judge, sprt

POLICY = CanaryPolicy(alpha=0.05, beta=0.10, worse_odds_ratio=0.5, min_observations=20, max_observations=2000)


def run_stream(
    p_canary: float, p_stable: float, seed: int, policy: CanaryPolicy = POLICY, step: int = 5
) -> tuple[str, int]:
    """Feed thumbs from both arms a few at a time, as a live canary monitor would; return the
    decision and how many thumbs per arm it took."""
    rng = random.Random(seed)
    canary: list[bool] = []
    stable: list[bool] = []
    while True:
        for _ in range(step):
            canary.append(rng.random() < p_canary)
            stable.append(rng.random() < p_stable)
        verdict = judge(canary, stable, [], policy)
        if verdict.decision != CONTINUE:
            return verdict.decision, len(canary)


def test_hand_computed_llr() -> None:
    # OR1 = 0.5 -> q1 = 1/3: each canary win adds ln(2/3), each loss adds ln(4/3).
    v = sprt(3, 5, POLICY)
    assert v.llr == pytest.approx(3 * math.log(2 / 3) + 5 * math.log(4 / 3))
    assert POLICY.upper == pytest.approx(math.log(0.9 / 0.05))
    assert POLICY.lower == pytest.approx(math.log(0.1 / 0.95))


def test_discordant_pairs_ignore_ties() -> None:
    assert discordant_pairs([True, True, False, False, True], [True, False, True, False]) == (1, 1)


def test_a_clearly_worse_canary_is_rolled_back() -> None:
    outcomes = [run_stream(0.3, 0.7, seed) for seed in range(50)]
    assert all(d == ROLL_BACK for d, _ in outcomes)
    assert max(n for _, n in outcomes) < 200  # caught quickly at this effect size


def test_an_equal_canary_is_promoted_and_false_rollbacks_stay_near_alpha() -> None:
    outcomes = [run_stream(0.6, 0.6, seed) for seed in range(400)]
    false_rollbacks = sum(d == ROLL_BACK for d, _ in outcomes) / len(outcomes)
    assert false_rollbacks <= POLICY.alpha + 0.03  # Wald's bound, with sampling slack for 400 runs
    assert sum(d == PROMOTE for d, _ in outcomes) / len(outcomes) >= 0.9


def test_a_better_canary_is_promoted() -> None:
    outcomes = [run_stream(0.8, 0.5, seed) for seed in range(50)]
    assert all(d == PROMOTE for d, _ in outcomes)


def test_a_worse_canary_slips_through_at_most_about_beta() -> None:
    # Exactly the effect the test is powered for: odds ratio 0.5 (0.6 -> 3/7).
    p_stable = 0.6
    odds = 0.5 * p_stable / (1 - p_stable)
    p_canary = odds / (1 + odds)
    outcomes = [run_stream(p_canary, p_stable, seed) for seed in range(300)]
    missed = sum(d == PROMOTE for d, _ in outcomes) / len(outcomes)
    assert missed <= POLICY.beta + 0.05


def test_head_to_head_choices_count_directly() -> None:
    assert judge([], [], [False] * 12, POLICY).decision == ROLL_BACK
    assert judge([], [], [True] * 25, POLICY).decision == PROMOTE
    assert judge([], [], [True] * 5, POLICY).decision == CONTINUE  # below min_observations


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        CanaryPolicy(alpha=0.7)
    with pytest.raises(ValueError, match="worse_odds_ratio"):
        CanaryPolicy(worse_odds_ratio=1.5)


def test_canary_buckets_are_sticky_and_split_in_proportion() -> None:
    assert canary_bucket("alice", "default") == canary_bucket("alice", "default")
    share = 0.2
    users = [f"user-{i}" for i in range(20000)]
    in_canary = sum(canary_bucket(u, "default") < share for u in users) / len(users)
    assert abs(in_canary - share) < 0.015
