"""The sequential test that decides a canary's fate from live feedback.

Question: is the canary *worse* than the version serving now? Each arm yields Bernoulli outcomes
(thumbs up = 1, down = 0). Pair the i-th canary outcome with the i-th stable outcome (both arms
are i.i.d. streams, so any pairing that ignores the values is valid). Only discordant pairs carry
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

    def __post_init__(self) -> None:
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ValueError("alpha and beta must be in (0, 0.5)")
        if not 0 < self.worse_odds_ratio < 1:
            raise ValueError("worse_odds_ratio must be in (0, 1): the canary's odds relative to the stable's")
        if self.min_observations < 1 or self.max_observations < self.min_observations:
            raise ValueError("need 1 <= min_observations <= max_observations")

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


def discordant_pairs(canary: Sequence[bool], stable: Sequence[bool]) -> tuple[int, int]:
    """(canary wins, canary losses) over the first min(len) outcomes of each arm, paired in order."""
    wins = losses = 0
    for c, s in zip(canary, stable, strict=False):  # the longer arm's extra outcomes wait for a partner
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
    canary_thumbs: Sequence[bool],
    stable_thumbs: Sequence[bool],
    head_to_head: Sequence[bool],
    policy: CanaryPolicy,
) -> Verdict:
    """Combine thumbs (paired across arms) and direct pairwise choices (True = the canary's
    completion was chosen over the stable one's) into one SPRT verdict."""
    wins, losses = discordant_pairs(canary_thumbs, stable_thumbs)
    wins += sum(1 for x in head_to_head if x)
    losses += sum(1 for x in head_to_head if not x)
    return sprt(wins, losses, policy)
