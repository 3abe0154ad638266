"""The reward model's gate as pure functions."""

from __future__ import annotations

import pytest

from tuneloop.trainer.config import RewardConfig
from tuneloop.trainer.reward_gate import (
    RewardGateMetrics,
    auc,
    decide_reward,
    length_baseline_accuracy,
    pairwise_accuracy,
    pearson,
    ranks,
    spearman,
)


def test_rank_statistics() -> None:
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.1, 0.2], [True, True]) is None


def test_accuracy_and_the_length_baseline() -> None:
    assert pairwise_accuracy([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == pytest.approx(1 / 3)  # a tie is a miss
    assert pairwise_accuracy([], []) == 0.0
    # Training pairs prefer the shorter reply: the baseline predicts "shorter wins" on held-out ones.
    train = [(3, 9), (4, 8), (5, 5)]
    assert length_baseline_accuracy(train, [(2, 7), (9, 3)]) == 0.5


def metrics(**kw: object) -> RewardGateMetrics:
    base: dict[str, object] = dict(
        heldout_pairs=20, accuracy=0.75, length_baseline_accuracy=0.55, margin=1.0, thumbs_auc=0.8,
        rating_spearman=0.5, length_correlation=0.1, reward_mean=0.0, reward_std=1.0,
    )  # fmt: skip
    base.update(kw)
    return RewardGateMetrics(**base)  # type: ignore[arg-type]


def test_decide_reward(caplog: pytest.LogCaptureFixture) -> None:
    cfg = RewardConfig()
    assert decide_reward(metrics(), cfg).passed
    low = decide_reward(metrics(accuracy=0.58, length_baseline_accuracy=0.5), cfg)
    assert low.failed_checks == ["accuracy"] and "0.580 < reward_min_accuracy 0.600" in low.failures[0]
    hack = decide_reward(metrics(accuracy=0.7, length_baseline_accuracy=0.8), cfg)
    assert hack.failed_checks == ["length_baseline"] and "length-only" in hack.failures[0]
    assert decide_reward(metrics(length_correlation=0.9), cfg).passed  # warned about, not refused
    assert "correlates with completion length at 0.90" in caplog.text
    assert not decide_reward(metrics(accuracy=float("nan")), cfg).passed


def test_the_reward_gate_checks_the_evidence_there_is() -> None:
    cfg = RewardConfig()
    # Only thumbs (no prompt with two replies): gated on the thumbs AUC alone.
    thumbs_only = dict(heldout_pairs=0, accuracy=0.0, length_baseline_accuracy=0.0, rating_spearman=None)
    assert decide_reward(metrics(**thumbs_only), cfg).passed
    weak = decide_reward(metrics(**{**thumbs_only, "thumbs_auc": 0.55}), cfg)
    assert weak.failed_checks == ["thumbs_auc"] and "0.550 < reward_min_thumbs_auc 0.600" in weak.failures[0]
    unranked = decide_reward(metrics(rating_spearman=0.05), cfg)
    assert unranked.failed_checks == ["rating_spearman"]
    none = decide_reward(metrics(**{**thumbs_only, "thumbs_auc": None}), cfg)
    assert none.failed_checks == ["evidence"] and "no held-out pairs" in none.failures[0]
