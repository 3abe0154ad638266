"""The sequential test that decides a canary's fate from live feedback.

Question: is the canary *worse* than the version serving now? Each arm yields Bernoulli outcomes
(thumbs up = 1, down = 0). Pair each canary outcome with a stable outcome served at nearly the
same time (within `pair_window_s`): users' thumbs-up rate drifts (time of day, a news event), and
with a small canary share the i-th outcomes of the two arms lie far apart in time, so pairing them
in arrival order would compare the canary with the stable version's *earlier* users. Any pairing
that looks only at times, not values, is valid under the null. Only discordant pairs carry
information about which arm is better: given a pair is discordant, the canary is the one with the
1 with probability q = OR / (1 + OR), where OR is the odds ratio of canary to stable
(Wald, *Sequential Analysis*, 1947, ch. 6: comparing two proportions). A pairwise choice between a
canary completion and a stable one is such an observation directly. Ties carry nothing.

Wald's SPRT on those observations tests H0: OR = 1 (not worse) against H1: OR = `worse_odds_ratio`
(e.g. 0.5: the canary's odds of a thumbs up are half the stable's):

    LLR = wins * ln(q1 / q0) + losses * ln((1 - q1) / (1 - q0)),  q0 = 1/2, q1 = OR1 / (1 + OR1)

Roll back when LLR >= ln((1 - beta) / alpha); promote when LLR <= ln(beta / (1 - alpha)) and at
least `min_observations` were seen. `alpha` bounds the chance of rolling back a canary that is
not worse; `beta` bounds the chance of promoting one that is worse by the stated odds ratio.
Wald's bounds make both approximate upper limits (the overshoot makes the test conservative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PROMOTE, ROLL_BACK, CONTINUE = "promote", "roll_back", "continue"


@dataclass(frozen=True)
class CanaryPolicy:
    alpha: float = 0.05  # P(roll back | canary not worse)
    beta: float = 0.10  # P(promote | canary worse by worse_odds_ratio)
    worse_odds_ratio: float = 0.5  # the effect the test is powered to catch
    min_observations: int = 20  # never promote on less evidence than this
    max_observations: int = 2000  # stop there: promote (the evidence is not of a worse canary)
    pair_window_s: float = 900.0  # a canary outcome is paired with a stable one served this close in time

    def __post_init__(self) -> None:
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ValueError("alpha and beta must be in (0, 0.5)")
        if not 0 < self.worse_odds_ratio < 1:
            raise ValueError("worse_odds_ratio must be in (0, 1): the canary's odds relative to the stable's")
        if self.min_observations < 1 or self.max_observations < self.min_observations:
            raise ValueError("need 1 <= min_observations <= max_observations")
        if not self.pair_window_s > 0:
            raise ValueError("pair_window_s must be > 0")

    @property
    def upper(self) -> float:
        return math.log((1 - self.beta) / self.alpha)

    @property
    def lower(self) -> float:
        return math.log(self.beta / (1 - self.alpha))


@dataclass(frozen=True)
class Verdict:
    decision: str  # PROMOTE, ROLL_BACK or CONTINUE
    llr: float
    wins: int  # informative observations favouring the canary
    losses: int  # informative observations favouring the stable version

    @property
    def observations(self) -> int:
        return self.wins + self.losses


# (served at, unix seconds; thumbs up), each arm's list in order of time.
Outcome = tuple[float, bool]


def time_matched_pairs(
    canary: Sequence[Outcome], stable: Sequence[Outcome], window_s: float
) -> list[tuple[bool, bool]]:
    """(canary up, stable up) pairs: each canary outcome with the unused stable outcome nearest in
    time within `window_s`, or none. Both lists sorted by time; O(len(canary) + len(stable)).

    Stable outcomes passed over are dropped, never reused: the pairing depends on the times alone.
    """
    pairs: list[tuple[bool, bool]] = []
    j = 0
    for t, up in canary:
        while j < len(stable) and stable[j][0] < t - window_s:
            j += 1  # too old for this canary outcome and for every later one
        best = None
        while j < len(stable) and stable[j][0] <= t + window_s:
            if best is not None and abs(stable[j][0] - t) >= abs(stable[best][0] - t):
                break  # the times only move away from t from here on
            best = j
            j += 1
        if best is not None:
            pairs.append((up, stable[best][1]))
            j = best + 1
    return pairs


def discordant_pairs(canary: Sequence[Outcome], stable: Sequence[Outcome], window_s: float) -> tuple[int, int]:
    """(canary wins, canary losses) over the time-matched pairs; concordant pairs carry nothing."""
    wins = losses = 0
    for c, s in time_matched_pairs(canary, stable, window_s):
        if c and not s:
            wins += 1
        elif s and not c:
            losses += 1
    return wins, losses


def sprt(wins: int, losses: int, policy: CanaryPolicy) -> Verdict:
    """Wald's SPRT of 'not worse' (q = 1/2) against 'worse' (q = OR1 / (1 + OR1))."""
    q1 = policy.worse_odds_ratio / (1 + policy.worse_odds_ratio)
    llr = wins * math.log(q1 / 0.5) + losses * math.log((1 - q1) / 0.5)
    n = wins + losses
    if llr >= policy.upper:
        decision = ROLL_BACK
    elif (llr <= policy.lower and n >= policy.min_observations) or n >= policy.max_observations:
        decision = PROMOTE
    else:
        decision = CONTINUE
    return Verdict(decision, llr, wins, losses)


def judge(
    canary_thumbs: Sequence[Outcome],
    stable_thumbs: Sequence[Outcome],
    head_to_head: Sequence[bool],
    policy: CanaryPolicy,
) -> Verdict:
    """Combine thumbs (paired across arms by time) and direct pairwise choices (True = the
    canary's completion was chosen over the stable one's; both served together, so no drift
    between them) into one SPRT verdict."""
    wins, losses = discordant_pairs(canary_thumbs, stable_thumbs, policy.pair_window_s)
    wins += sum(1 for x in head_to_head if x)
    losses += sum(1 for x in head_to_head if not x)
    return sprt(wins, losses, policy)


@dataclass(frozen=True)
class LeaseTiming:
    renew_s: float = 2.0  # how often the holder renews (and a follower tries to take it)
    ttl_s: float = 6.0  # how long a lease lasts after its last renewal, in the database's clock

    def __post_init__(self) -> None:
        if not self.renew_s > 0:
            raise ValueError(f"the lease's renew interval must be > 0 seconds, got {self.renew_s}")
        # Two renewals may fail or run late before the lease can lapse under a live holder, and it
        # keeps one whole interval between stopping here and another replica starting.
        if self.ttl_s < 3 * self.renew_s:
            raise ValueError(
                f"the lease's ttl ({self.ttl_s} s) must be at least 3x its renew interval ({self.renew_s} s)"
            )
