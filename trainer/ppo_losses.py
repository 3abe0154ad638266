"""PPO on a language-model policy, as pure tensor functions.

Shapes: B sequences, T completion positions (right-padded); `mask` (B, T) is 1 on real
completion tokens and 0 on padding. Every per-token tensor is (B, T) and padding never
contributes to a mean.

References: PPO, Schulman et al. 2017 (arXiv 1707.06347), Eq. 7 (clipped objective); GAE,
Schulman et al. 2016 (arXiv 1506.02438), Eq. 16; KL-shaped reward and the adaptive KL
controller, Ziegler et al. 2019 (arXiv 1909.08593), Sec. 2.2; the clipped value loss and the
k1/k3 KL estimators as in "The N+ implementation details of RLHF with PPO" (Huang et al. 2024,
arXiv 2403.17031) and Schulman's "Approximating KL divergence" note (2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1.

    Args:
        values: (B, T) any float tensor.
        mask:   (B, T) 0/1.
        dim:    None for one scalar over the batch, 1 for a (B,) mean per sequence.

    Returns:
        sum(values * mask) / max(sum(mask), 1) over `dim`.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Whiten `values` with the mean and (unbiased) variance of its unmasked entries.

    Args:
        values:     (B, T).
        mask:       (B, T) 0/1.
        shift_mean: False keeps the mean (used for rewards, whose sign matters).

    Returns:
        (B, T): (x - mu) / sqrt(var + 1e-8), or x / sqrt(var + 1e-8) + mu without the shift;
        padding positions are 0.
    """
    mean = masked_mean(values, mask)
    m = mask.to(values.dtype)
    n = m.sum()
    var = ((values - mean) ** 2 * m).sum() / (n - 1).clamp(min=1.0)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded completions.

    Args:
        rewards: (B, T) per-token rewards r_t.
        values:  (B, T) the critic's V(s_t), detached.
        mask:    (B, T) 0/1; the episode ends after the last 1 (V beyond it is 0).
        gamma:   discount in [0, 1].
        lam:     GAE lambda in [0, 1].

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1};
    returns R_t = A_t + V(s_t) (the critic's regression target).

    Returns:
        (advantages, returns), each (B, T), 0 on padding.
    """
    m = mask.to(rewards.dtype)
    values = values * m
    rewards = rewards * m
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv_t
        # A padded step resets the recursion so a sequence's last real token bootstraps from 0.
        next_value = values[:, t]
        next_adv = adv_t
    return advantages, (advantages + values) * m


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate on the sampled tokens (k1): log pi(y_t) - log pi_ref(y_t).

    Args:
        logprobs:     (B, T) log-probs of the sampled tokens under the rollout policy.
        ref_logprobs: (B, T) same tokens under the reference.
        mask:         (B, T) 0/1.

    Unbiased for KL(pi || pi_ref) when y ~ pi (plain temperature sampling; top-k/top-p would
    make the sampler differ from pi and bias it). Returns (B, T), 0 on padding.
    """
    return (logprobs - ref_logprobs) * mask.to(logprobs.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last 1 in a right-padded (B, T) mask (0 for an empty row)."""
    lengths = mask.long().sum(1)
    return (lengths - 1).clamp(min=0)


@dataclass(frozen=True)
class ShapedRewards:
    """Per-token rewards and their parts."""

    rewards: torch.Tensor  # (B, T) score at the last token minus kl_coef * KL per token
    score: torch.Tensor  # (B,) the normalised, clipped, EOS-penalised score
    kl: torch.Tensor  # (B, T) k1 KL per token
    non_score_reward: torch.Tensor  # (B,) -kl_coef * sum_t KL_t


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    ended: torch.Tensor,
    *,
    kl_coef: float,
    score_mean: float = 0.0,
    score_std: float = 1.0,
    score_clip: float = 5.0,
    missing_eos_penalty: float = 1.0,
) -> ShapedRewards:
    """The RLHF reward: a sequence score at the last token, a per-token KL penalty.

    Args:
        scores:              (B,) raw reward-model scores of the completions.
        logprobs:            (B, T) rollout-policy log-probs of the sampled tokens.
        ref_logprobs:        (B, T) reference log-probs of the same tokens.
        mask:                (B, T) 0/1 completion tokens.
        ended:               (B,) bool, the completion ended with end-of-sequence.
        kl_coef:             beta >= 0, the KL penalty coefficient.
        score_mean/std:      the reward model's saved score statistics (normalisation).
        score_clip:          |normalised score| is clipped to this (> 0).
        missing_eos_penalty: subtracted from the score of a completion cut at the length limit.

    s = clip((score - mean) / std, -c, c) - penalty * [no EOS];
    r_t = -beta * (log pi(y_t) - log pi_ref(y_t)) + s * [t = last token]   (Ziegler et al. 2019)
    """
    score = ((scores - score_mean) / score_std).clamp(-score_clip, score_clip)
    score = score - missing_eos_penalty * (~ended.bool()).to(score.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, mask)
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += score.to(rewards.dtype) * (mask.sum(1) > 0).to(rewards.dtype)
    return ShapedRewards(rewards=rewards, score=score, kl=kl, non_score_reward=-kl_coef * kl.sum(1))


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # scalar, share of tokens where the clipped term was taken
    approx_kl: torch.Tensor  # scalar, k3 estimate of KL(pi_old || pi) on the sampled tokens
    ratio: torch.Tensor  # scalar, mean pi / pi_old


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, clip: float
) -> PolicyLossOutput:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated to minimise.

    Args:
        logprobs:     (B, T) current policy log-probs of the sampled tokens (differentiable).
        old_logprobs: (B, T) the rollout policy's log-probs (detached).
        advantages:   (B, T) whitened advantages (detached).
        mask:         (B, T) 0/1.
        clip:         epsilon > 0.

    rho = exp(logp - logp_old); L = mean_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps)).
    approx_kl = mean((rho - 1) - log rho)  (k3, always >= 0).
    """
    log_ratio = (logprobs - old_logprobs) * mask.to(logprobs.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl, ratio=mean_ratio)


@dataclass(frozen=True)
class ValueLossOutput:
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # scalar, share of tokens where the clipped error was larger


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip: float
) -> ValueLossOutput:
    """The critic's clipped regression loss (the PPO2 / OpenAI baselines form).

    Args:
        values:     (B, T) current V(s_t) (differentiable).
        old_values: (B, T) V at rollout time (detached).
        returns:    (B, T) GAE returns (detached).
        mask:       (B, T) 0/1.
        clip:       epsilon_v > 0, how far V may move from old_values per iteration.

    V_c = old + clip(V - old, -eps_v, eps_v); L = 0.5 * mean_t max((V - R)^2, (V_c - R)^2).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).to(values.dtype), mask)
    return ValueLossOutput(loss=loss, clip_fraction=clip_fraction)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position.

    Args:
        logits: (..., V) unnormalised logits (computed in float32).

    Returns:
        (...) H = logsumexp(z) - sum softmax(z) * z.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. 2019, Sec. 2.2: steer beta so the observed KL tracks a target.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    with KL the mean per-sequence KL of the last iteration and n_steps its number of sequences.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0, horizon > 0; got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
