"""The canary's sequential test on synthetic feedback streams (worse, equal, better, and equal
while users' thumbs-up rate drifts under a small canary share)."""

from __future__ import annotations

import math
import random

import pytest

from tuneloop.server.adapters import canary_bucket
from tuneloop.server.canary import (
    CONTINUE,
    PROMOTE,
    ROLL_BACK,
    CanaryPolicy,
    Outcome,
    discordant_pairs,
    judge,
    sprt,
    time_matched_pairs,
)

POLICY = CanaryPolicy(alpha=0.05, beta=0.10, worse_odds_ratio=0.5, min_observations=20, max_observations=2000)


def run_stream(
    p_canary: float, p_stable: float, seed: int, policy: CanaryPolicy = POLICY, step: int = 5
) -> tuple[str, int]:
    """Feed thumbs from both arms a few at a time, as a live canary monitor would; return the
    decision and how many thumbs per arm it took."""
    rng = random.Random(seed)
    canary: list[Outcome] = []
    stable: list[Outcome] = []
    while True:
        for _ in range(step):
            t = float(len(canary))
            canary.append((t, rng.random() < p_canary))
            stable.append((t, rng.random() < p_stable))
        verdict = judge(canary, stable, [], policy)
        if verdict.decision != CONTINUE:
            return verdict.decision, len(canary)


def test_hand_computed_llr() -> None:
    # OR1 = 0.5 -> q1 = 1/3: each canary win adds ln(2/3), each loss adds ln(4/3).
    v = sprt(3, 5, POLICY)
    assert v.llr == pytest.approx(3 * math.log(2 / 3) + 5 * math.log(4 / 3))
    assert POLICY.upper == pytest.approx(math.log(0.9 / 0.05))
    assert POLICY.lower == pytest.approx(math.log(0.1 / 0.95))


def at(*ups: bool, start: float = 0.0) -> list[Outcome]:
    return [(start + i, up) for i, up in enumerate(ups)]


def test_discordant_pairs_ignore_ties() -> None:
    assert discordant_pairs(at(True, True, False, False, True), at(True, False, True, False), 10.0) == (1, 1)


def test_pairs_are_matched_by_time_within_the_window() -> None:
    canary = [(100.0, True), (200.0, False), (1000.0, True)]
    stable = [(0.0, False), (95.0, False), (99.0, True), (150.0, False), (205.0, True), (206.0, True)]
    # 100 takes 99 (nearest; 95 is dropped), 200 takes 205, 1000 has no stable outcome within 60 s.
    assert time_matched_pairs(canary, stable, 60.0) == [(True, True), (False, True)]
    assert time_matched_pairs(canary, [], 60.0) == [] and time_matched_pairs([], stable, 60.0) == []
    # A stable outcome is used once.
    assert time_matched_pairs([(10.0, True), (10.0, False)], [(10.0, False)], 5.0) == [(True, False)]


def drifting_stream(seed: int, share: float, pairing: str, policy: CanaryPolicy) -> str:
    """An equal canary (same thumbs-up rate as the stable version at every moment) while the
    rate falls from 0.8 to 0.2: one completion a second, `share` of them served by the canary."""
    rng = random.Random(seed)
    canary: list[Outcome] = []
    stable: list[Outcome] = []
    t = 0.0
    while True:
        t += 1.0
        up = rng.random() < max(0.2, 0.8 - t / 3000)
        (canary if rng.random() < share else stable).append((t, up))
        if len(canary) % 10 or not canary or canary[-1][0] != t:
            continue
        if pairing == "arrival":  # the i-th outcome of one arm against the i-th of the other
            wins = sum(c and not s for (_, c), (_, s) in zip(canary, stable, strict=False))
            losses = sum(s and not c for (_, c), (_, s) in zip(canary, stable, strict=False))
            decision = sprt(wins, losses, policy).decision
        else:
            decision = judge(canary, stable, [], policy).decision
        if decision != CONTINUE:
            return decision


def test_false_rollbacks_stay_near_alpha_under_drift_with_a_small_canary_share() -> None:
    policy = CanaryPolicy(pair_window_s=60.0)
    runs = 300
    matched = [drifting_stream(seed, 0.05, "time", policy) for seed in range(runs)]
    assert sum(d == ROLL_BACK for d in matched) / runs <= policy.alpha + 0.03
    # What the time matching protects against: paired in arrival order, the canary's outcomes
    # (later, when users are less pleased) are compared with the stable version's earlier ones.
    arrival = [drifting_stream(seed, 0.05, "arrival", policy) for seed in range(runs)]
    assert sum(d == ROLL_BACK for d in arrival) / runs > 0.3


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
    with pytest.raises(ValueError, match="pair_window_s"):
        CanaryPolicy(pair_window_s=0.0)


def test_canary_buckets_are_sticky_and_split_in_proportion() -> None:
    assert canary_bucket("alice", "default") == canary_bucket("alice", "default")
    share = 0.2
    users = [f"user-{i}" for i in range(20000)]
    in_canary = sum(canary_bucket(u, "default") < share for u in users) / len(users)
    assert abs(in_canary - share) < 0.015
