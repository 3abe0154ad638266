"""Reward-model losses, pure functions on tensors, all on one reward scale r (nats of preference).

Every kind of feedback trains the same scalar r(prompt, completion):

- pairs (explicit choices, corrections over the text they correct, same-prompt rating gaps):
  Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r - m), m an optional margin
  (Touvron et al. 2023 use the rating gap as m);
- thumbs: P(up) = sigmoid(r - a) against a learned anchor a, with up and down weighted
  equally (users give far more of one kind than the other);
- 1-5 ratings: ordinal, cumulative logit P(y <= k) = sigmoid(theta_k - r) with learned ordered
  thresholds theta_1 < ... < theta_{K-1} (McCullagh 1980);
- centering: an optional penalty on the squared mean reward keeps r near 0 (Eisenstein et al.
  2023), so scores are comparable across reward-model versions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r - m).

    chosen, rejected: (B,) rewards; margin: (B,) or None (0); weight: (B,) per-pair weights or None.
    Returns a scalar.
    """
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    return _weighted_mean(losses, weight)


def thumbs_loss(reward: torch.Tensor, up: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Balanced logistic loss of thumbs against the anchor a:
    1/2 mean_up[-log sigmoid(r - a)] + 1/2 mean_down[-log sigmoid(a - r)].

    reward: (N,); up: (N,) bool; anchor: scalar. A side with no examples contributes 0 and the
    other side carries the whole loss. Returns a scalar.
    """
    logits = reward - anchor
    up = up.bool()
    parts = [(-F.logsigmoid(logits[up])), (-F.logsigmoid(-logits[~up]))]
    present = [p.mean() for p in parts if p.numel()]
    if not present:
        return reward.sum() * 0.0
    return torch.stack(present).mean()


def ordered_thresholds(first: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """(K-1,) strictly increasing thresholds from an unconstrained first one and K-2 raw gaps:
    theta_1 = first, theta_{k+1} = theta_k + softplus(gap_k)."""
    return torch.cat([first.reshape(1), first + torch.cumsum(F.softplus(gaps), 0)])


def ordinal_loss(reward: torch.Tensor, rating: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Mean of -log P(y = rating) under the cumulative logit model
    P(y <= k) = sigmoid(theta_k - r), theta_0 = -inf, theta_K = +inf.

    reward: (N,); rating: (N,) integers in 1..K; thresholds: (K-1,) increasing. Returns a scalar.
    """
    k = thresholds.numel() + 1
    inf = torch.tensor([torch.inf], dtype=thresholds.dtype, device=thresholds.device)
    cuts = torch.cat([-inf, thresholds, inf])  # (K+1,): theta_0 .. theta_K
    idx = rating.long().clamp(1, k)
    upper = torch.sigmoid(cuts[idx] - reward)
    lower = torch.sigmoid(cuts[idx - 1] - reward)
    return -torch.log((upper - lower).clamp_min(1e-12)).mean()


def centering_penalty(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient * mean(r)^2 over every reward of the batch; 0 when coefficient is 0."""
    if coefficient == 0.0 or rewards.numel() == 0:
        return rewards.sum() * 0.0
    return coefficient * rewards.mean() ** 2


def _weighted_mean(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp_min(1e-12)
