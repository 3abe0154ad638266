"""Preference losses and sequence log-probabilities, as pure tensor functions.

References: DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7; conservative DPO (label
smoothing, Mitchell 2023, "A note on DPO with noisy preferences"); IPO, Azar et al. 2023
(arXiv 2310.12036), Eq. 17, with log-ratios averaged per completion token as TRL and the IPO
authors do, so beta means the same for short and long completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair results; every tensor has shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w|x) - log pi_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # beta * (log pi(y_l|x) - log pi_ref(y_l|x)), detached

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """The DPO family of losses for a batch of B pairs.

    Args:
        policy_chosen_logps:   (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) same for the rejected completions.
        ref_chosen_logps:      (B,) summed log-probs of the chosen completions under the reference.
        ref_rejected_logps:    (B,) same for the rejected completions.
        beta:                  KL strength (tau for IPO), > 0.
        label_smoothing:       eps in [0, 0.5): the assumed probability that a label is flipped
                               (conservative DPO). sigmoid only.
        loss_type:             "sigmoid" (DPO / cDPO) or "ipo".
        chosen_lengths:        (B,) completion token counts; required for "ipo".
        rejected_lengths:      (B,) same for the rejected completions.

    With h = (log pi_w - log ref_w) - (log pi_l - log ref_l):
        sigmoid: -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        ipo:     (h_avg - 1 / (2 * beta))^2, h_avg using per-token-averaged log-ratios

    Returns per-pair losses (B,) and implicit rewards (B,); the caller takes the mean.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths (completion token counts)")
        h_avg = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (h_avg - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def completion_positions(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the completion tokens' predictions come from.

    Args:
        completion_mask: (N, T) 1 on completion tokens, 0 on prompt and padding.

    Returns:
        (rows, cols), each (K,) with K = completion tokens in the batch: the hidden state at
        (rows, cols) predicts the token at (rows, cols + 1), which is a completion token.
    """
    target = completion_mask[:, 1:].bool()
    rows, cols = target.nonzero(as_tuple=True)
    return rows, cols


class _TargetLogProbs(torch.autograd.Function):
    """log_softmax(logits)[target] row by row, in float32 chunks.

    The plain expression materialises float32 copies of the whole (K, V) logits for the forward
    and again for the backward (for SmolLM2's 49k vocabulary and 3k completion tokens that is
    0.6 GB per copy, and the time goes to memory traffic). Here only one chunk is float32 at a
    time, the forward keeps just the per-row log-sum-exp, and the backward rebuilds the softmax
    chunk by chunk: d logp_t / d logits = onehot(t) - softmax.
    """

    CHUNK = 128  # rows per float32 chunk: 128 x 49k x 4 B = 25 MB

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 if given
        out = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], _TargetLogProbs.CHUNK):
            chunk = logits[s : s + _TargetLogProbs.CHUNK].to(acc)
            lse[s : s + chunk.shape[0]] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, targets[s : s + chunk.shape[0], None]).squeeze(-1)
            out[s : s + chunk.shape[0]] = picked - lse[s : s + chunk.shape[0]]
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], _TargetLogProbs.CHUNK):
            e = min(s + _TargetLogProbs.CHUNK, logits.shape[0])
            g = grad_out[s:e, None].to(lse.dtype)
            chunk = torch.exp(logits[s:e].to(lse.dtype) - lse[s:e, None]).mul_(-g)  # -softmax * g
            chunk.scatter_add_(-1, targets[s:e, None], g)  # + onehot * g
            grad[s:e] = chunk
        return grad, None


def gathered_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from unnormalised logits.

    Args:
        logits:  (K, V) logits of K positions (any float dtype; computed in float32).
        targets: (K,) token ids.

    Returns:
        (K,) float32 (float64 for float64 logits) log-probabilities, differentiable in `logits`.
    """
    return _TargetLogProbs.apply(logits, targets)


def sum_by_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Scatter-add per-token values into per-sequence sums.

    Args:
        values: (K,) per-token values.
        rows:   (K,) the sequence index of each value.
        n_rows: N, the number of sequences.

    Returns:
        (N,) sums; a sequence with no completion token sums to 0.
    """
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
