"""The KTO loss, its reference point and its class weights, as pure tensor functions.

Reference: KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv 2402.01306), Eq. 7 (the loss) and Eq. 8 (the class weights), numbered as TRL cites them.
The reference point z0 is estimated as TRL's `KTOTrainer` does: from mismatched (prompt,
completion) pairs of the same batch, without gradient, clamped at 0.

With r(x, y) = log pi(y|x) - log pi_ref(y|x):
    z0      = max(0, mean over the batch's mismatched pairs (x_i, y'_i) of r(x_i, y'_i))   (no gradient)
    v(x, y) = lambda_D * sigmoid(beta * (r(x, y) - z0))   for a desirable y
              lambda_U * sigmoid(beta * (z0 - r(x, y)))   for an undesirable y
    L       = E[lambda_y - v(x, y)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper's rule for unbalanced data (Eq. 8): lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
BALANCE_LOW, BALANCE_HIGH = 1.0, 4.0 / 3.0


@dataclass(frozen=True)
class KTOLossOutput:
    """Per-example results; every tensor has shape (B,)."""

    losses: torch.Tensor  # lambda_y * (1 - sigmoid(...)): the caller takes the mean over the batch
    rewards: torch.Tensor  # the implicit reward beta * r(x, y), detached


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z0, the estimate of KL(pi || pi_ref) that KTO's value function is measured from.

    Args:
        policy_kl_logps: (M,) summed log-probs of M mismatched completions y'_i given prompts x_i
                         (another example's completion) under the policy.
        ref_kl_logps:    (M,) the same under the reference.

    Returns:
        () max(0, mean(policy - ref)), detached: the paper and TRL pass no gradient through z0
        (it only shifts where the sigmoid saturates), and a negative estimate of a KL is clamped.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """The KTO loss of B unpaired examples.

    Args:
        policy_logps:       (B,) summed completion log-probs under the policy.
        ref_logps:          (B,) the same under the reference.
        desirable:          (B,) bool: True for a desirable completion (thumbs up), False otherwise.
        reference_point:    z0, a scalar (see `kto_reference_point`); no gradient flows through it.
        beta:               > 0, the sharpness of the value function (and strength of the KL anchor).
        desirable_weight:   lambda_D.
        undesirable_weight: lambda_U.

    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))     with r = policy - ref

    Returns per-example losses (B,) and implicit rewards beta * r (B,); the caller takes the mean.
    """
    logratios = policy_logps - ref_logps
    z0 = torch.as_tensor(reference_point, dtype=logratios.dtype, device=logratios.device).detach()
    desirable = desirable.to(device=logratios.device, dtype=torch.bool)
    # One signed expression: +(r - z0) for desirable examples, -(r - z0) for undesirable ones.
    sign = torch.where(desirable, 1.0, -1.0).to(logratios.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = weight * (1.0 - torch.sigmoid(beta * sign * (logratios - z0)))
    return KTOLossOutput(losses=losses, rewards=(beta * logratios).detach())


def balanced_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) for a dataset with these class counts, by the paper's rule
    lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].

    Counts already in the range keep (1, 1). Otherwise the minority class is weighted up to the
    nearest end of the range, and the majority keeps weight 1 (as TRL recommends: one weight moves,
    not both): with fewer desirable examples lambda_D = n_U / n_D; with more than 4/3 as many,
    lambda_U = 3 n_D / (4 n_U). A class with no examples leaves the weights at (1, 1): there is
    nothing to balance against.
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError("class counts must be >= 0")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < BALANCE_LOW:
        return BALANCE_LOW / ratio, 1.0
    if ratio > BALANCE_HIGH:
        return 1.0, ratio / BALANCE_HIGH
    return 1.0, 1.0
