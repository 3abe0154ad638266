"""Reward-model losses on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from tuneloop.trainer.reward_losses import (
    bradley_terry_loss,
    centering_penalty,
    ordered_thresholds,
    ordinal_loss,
    thumbs_loss,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry() -> None:
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert bradley_terry_loss(c, r).item() == pytest.approx((-math.log(sig(1.0)) + math.log(2)) / 2, rel=1e-6)
    # A margin asks for a larger gap: a gap of 1 against a margin of 1 is a coin flip.
    assert bradley_terry_loss(c[:1], r[:1], margin=torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    w = torch.tensor([3.0, 1.0])
    expected = (3 * -math.log(sig(1.0)) + math.log(2)) / 4
    assert bradley_terry_loss(c, r, weight=w).item() == pytest.approx(expected, rel=1e-6)


def test_thumbs_are_balanced_between_up_and_down() -> None:
    reward = torch.tensor([1.0, 1.0, 1.0, -1.0])
    up = torch.tensor([True, True, True, False])
    a = torch.tensor(0.0)
    expected = 0.5 * -math.log(sig(1.0)) + 0.5 * -math.log(sig(1.0))
    assert thumbs_loss(reward, up, a).item() == pytest.approx(expected, rel=1e-6)
    # Three ups do not outweigh one down: the same loss as one up and one down.
    assert thumbs_loss(torch.tensor([1.0, -1.0]), torch.tensor([True, False]), a).item() == pytest.approx(expected)
    assert thumbs_loss(torch.tensor([0.5]), torch.tensor([True]), torch.tensor(0.5)).item() == pytest.approx(
        math.log(2)
    )
    assert thumbs_loss(torch.zeros(0), torch.zeros(0, dtype=torch.bool), a).item() == 0.0


def test_ordinal_cumulative_logit() -> None:
    theta = ordered_thresholds(torch.tensor(-1.0), torch.tensor([0.0, 0.0, 0.0]))
    step = math.log(2)  # softplus(0)
    assert theta.tolist() == pytest.approx([-1.0, -1.0 + step, -1.0 + 2 * step, -1.0 + 3 * step])
    r = torch.tensor([0.0, 0.0, 0.0])
    ratings = torch.tensor([1, 3, 5])
    p1 = sig(theta[0].item())
    p3 = sig(theta[2].item()) - sig(theta[1].item())
    p5 = 1 - sig(theta[3].item())
    expected = -(math.log(p1) + math.log(p3) + math.log(p5)) / 3
    assert ordinal_loss(r, ratings, theta).item() == pytest.approx(expected, rel=1e-6)
    # A higher reward makes a 5 more likely than a 1.
    hi = ordinal_loss(torch.tensor([3.0]), torch.tensor([5]), theta)
    lo = ordinal_loss(torch.tensor([3.0]), torch.tensor([1]), theta)
    assert hi < lo


def test_gradients_flow_to_thresholds_and_anchor() -> None:
    first, gaps = torch.tensor(0.0, requires_grad=True), torch.zeros(3, requires_grad=True)
    anchor = torch.tensor(0.0, requires_grad=True)
    loss = ordinal_loss(torch.tensor([2.0]), torch.tensor([4]), ordered_thresholds(first, gaps))
    loss = loss + thumbs_loss(torch.tensor([1.0]), torch.tensor([False]), anchor)
    loss.backward()
    assert first.grad is not None and gaps.grad is not None and anchor.grad is not None
    assert anchor.grad.item() < 0  # a down-voted reply above the anchor pulls the anchor up


def test_centering() -> None:
    assert centering_penalty(torch.tensor([1.0, 3.0]), 0.1).item() == pytest.approx(0.4)
    assert centering_penalty(torch.tensor([1.0, 3.0]), 0.0).item() == 0.0
