"""PPO's pure functions on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from tuneloop.trainer.ppo_losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    shape_rewards,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_masked_mean_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(15.0 / 5)
    assert masked_mean(x, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])


def test_whitening_has_zero_mean_unit_variance_on_real_tokens() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    w = masked_whiten(x, MASK)
    # values 1..5: mean 3, unbiased var 2.5
    assert w[0].tolist() == pytest.approx([-2 / math.sqrt(2.5), -1 / math.sqrt(2.5), 0.0], abs=1e-5)
    assert w[1, 2].item() == 0.0
    kept = masked_whiten(x, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(3.0, abs=1e-5)  # the mean is kept


def test_gae_hand_values_and_padding_bootstraps_from_zero() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - 0.5 = 0.5; d1 = 0 + 0.5 - 0.5 = 0; d0 = 0
    #        A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0 + 0.5 * 0.25 = 0.125
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    # row 1 ends at t=1 (the 9 and 7 are padding): d1 = 2 - 1 = 1, d0 = 0 + 1 - 1 = 0; A0 = 0.5
    assert adv[1].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert ret[1].tolist() == pytest.approx([1.5, 2.0, 0.0])
    adv_g, _ = gae(rewards, values, MASK, gamma=0.5, lam=1.0)
    # row 0: d2 = 0.5, d1 = 0.25 - 0.5 = -0.25, d0 = 0.25 - 0.5 = -0.25
    #        A2 = 0.5, A1 = -0.25 + 0.25 = 0, A0 = -0.25 + 0 = -0.25
    assert adv_g[0].tolist() == pytest.approx([-0.25, 0.0, 0.5])


def test_kl_penalty_and_reward_shaping() -> None:
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    kl = kl_penalty(lp, ref, MASK)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.5, 0.0]]))
    out = shape_rewards(
        torch.tensor([3.0, 30.0]), lp, ref, MASK, torch.tensor([True, False]),
        kl_coef=0.1, score_mean=1.0, score_std=2.0, score_clip=5.0, missing_eos_penalty=1.0,
    )
    # row 0: (3 - 1) / 2 = 1; row 1: (30 - 1) / 2 = 14.5 -> clipped 5, no EOS -> 4
    assert out.score.tolist() == pytest.approx([1.0, 4.0])
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [-0.05, -0.05 + 4.0, 0.0]]))
    assert out.non_score_reward.tolist() == pytest.approx([0.0, -0.1])


def test_clipped_policy_loss_hand_values_and_gradient() -> None:
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    out = clipped_policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    # t0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped: no gradient)
    # t1: ratio 0.5, A=1: max(-0.5, -0.8) = -0.5 (unclipped); t2: ratio 1, A=-2: 2
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.ratio.item() == pytest.approx(1.0)
    # k3: (1.5 - 1 - log 1.5) + (0.5 - 1 - log 0.5) + 0
    assert out.approx_kl.item() == pytest.approx((0.5 - math.log(1.5) - 0.5 + math.log(2)) / 3, abs=1e-6)
    out.loss.backward()
    assert new.grad[0, 0].item() == 0.0  # clipped token
    assert new.grad[0, 1].item() < 0  # positive advantage: raise its log-prob
    assert new.grad[0, 2].item() > 0  # negative advantage: lower it


def test_clipped_value_loss_hand_values() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]], requires_grad=True)
    ret = torch.tensor([[0.0, 1.0]])
    out = clipped_value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # t0: err 1, clipped V 0.2 -> 0.04; max 1. t1: err 0.81, clipped V 0.1 -> 0.81; max 0.81
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 0.81) / 2)
    assert out.clip_fraction.item() == 0.0
    one = torch.ones(1, 1)
    far = clipped_value_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[1.0]]), one, clip=0.2)
    # V moved away from the return: err 4, clipped V -0.2 -> 1.44; the max keeps 4
    assert far.loss.item() == pytest.approx(2.0)
    toward = clipped_value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([[1.0]]), one, clip=0.2)
    # V overshot toward the return: err 1, clipped V 0.2 -> 0.64; max 1 (not clipped), fraction 0
    assert toward.loss.item() == pytest.approx(0.5)
    overstep = clipped_value_loss(torch.tensor([[0.9]]), torch.zeros(1, 1), torch.tensor([[1.0]]), one, clip=0.2)
    # err 0.01, clipped V 0.2 -> 0.64: the clipped error wins
    assert overstep.loss.item() == pytest.approx(0.32) and overstep.clip_fraction.item() == 1.0


def test_entropy() -> None:
    h = entropy_from_logits(torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    assert h.tolist() == pytest.approx([math.log(4), 0.0], abs=1e-5)


def test_kl_controllers() -> None:
    assert FixedKLController(0.05).update(10.0, 64) == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 12 is 100% over target: error clipped to 0.2; beta *= 1 + 0.2 * 10 / 100
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * 1.02)
    # KL 4.5 is 25% under: error -0.25 clipped to -0.2
    assert ctl.update(4.5, 50) == pytest.approx(0.1 * 1.02 * 0.9)
    # KL 5.4: error -0.1
    assert ctl.update(5.4, 100) == pytest.approx(0.1 * 1.02 * 0.9 * 0.9)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
