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
    spearman_upper,
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
        heldout_thumbs_up=0, heldout_thumbs_down=0, heldout_ratings=0,
    )  # fmt: skip
    base.update(kw)
    return RewardGateMetrics(**base)  # type: ignore[arg-type]


def test_decide_reward(caplog: pytest.LogCaptureFixture) -> None:
    cfg = RewardConfig()
    assert decide_reward(metrics(), cfg).passed
    # A floor fails only beyond sampling noise: 0.58 on 20 held-out pairs may be a 0.6 model,
    # on 400 it is not (95% upper bounds 0.741 and 0.590).
    assert decide_reward(metrics(accuracy=0.58, length_baseline_accuracy=0.5), cfg).passed
    low = decide_reward(metrics(accuracy=0.55, heldout_pairs=400, length_baseline_accuracy=0.5), cfg)
    assert low.failed_checks == ["accuracy"]
    assert "0.550 over 400 pairs (95% upper bound 0.590) < reward_min_accuracy 0.600" in low.failures[0]
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
    # The AUC's bound is the Wilson bound over the smaller class: 0.59 on 17 up and 18 down
    # thumbs may be a 0.6 model; 0.55 on 300 and 400 is not.
    assert decide_reward(metrics(**{**thumbs_only, "thumbs_auc": 0.59, "heldout_thumbs_up": 17,
                                    "heldout_thumbs_down": 18}), cfg).passed  # fmt: skip
    weak = decide_reward(metrics(**{**thumbs_only, "thumbs_auc": 0.55, "heldout_thumbs_up": 300,
                                    "heldout_thumbs_down": 400}), cfg)  # fmt: skip
    assert weak.failed_checks == ["thumbs_auc"]
    assert "0.550 over 300 up and 400 down (95% upper bound 0.597) < reward_min_thumbs_auc 0.600" in weak.failures[0]
    assert decide_reward(metrics(rating_spearman=0.05, heldout_ratings=30), cfg).passed
    unranked = decide_reward(metrics(rating_spearman=-0.05, heldout_ratings=400), cfg)
    assert unranked.failed_checks == ["rating_spearman"]
    none = decide_reward(metrics(**{**thumbs_only, "thumbs_auc": None}), cfg)
    assert none.failed_checks == ["evidence"] and "no held-out pairs" in none.failures[0]


def test_the_upper_bound_of_a_rank_correlation() -> None:
    # Fisher z: tanh(atanh(0.2) + 1.645 * sqrt(1.06 / 97)) by hand.
    assert spearman_upper(0.2, 100) == pytest.approx(0.35809, abs=1e-4)
    assert spearman_upper(0.2, 3) == 1.0  # too few points to bound anything
    assert not spearman_upper(float("nan"), 100) >= -1.0  # a NaN correlation still fails its floor
    assert spearman_upper(1.0, 50) <= 1.0 and spearman_upper(-1.0, 50) > -1.0
    assert spearman_upper(0.2, 1000) < spearman_upper(0.2, 100)  # more points, tighter bound
