"""The DPO loop on a LoRA adapter.

What makes it cheap on a CPU, compared with a generic trainer:
  * reference log-probs are computed once per run (the reference never changes), so a step is
    one policy forward + backward instead of two forwards + backward;
  * the LM head runs only on completion positions (`completion_logps`);
  * chosen and rejected go through the model as one batch;
  * bf16 autocast where the hardware has bf16 math.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import DPOConfig
from .distributed import DataParallel
from .losses import preference_loss
from .model import (
    adapter_mode,
    collate_sequences,
    completion_logps,
    encode_completion,
    encode_prompt,
    trainable_parameters,
)
from .optim import TrainResult, apply_gradients, run_epochs
from .rows import PreferencePair

__all__ = ["TrainResult", "collate_sequences", "encode_completion"]  # shared pieces, imported from here too

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


@dataclass(frozen=True)
class PairBatch:
    """B pairs as one model batch: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    input_ids, attention_mask, completion_mask: (2B, T), right-padded.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    def completion_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,), (B,) completion token counts of chosen and rejected."""
        lengths = self.completion_mask.sum(dim=1)
        return lengths[: self.n_pairs], lengths[self.n_pairs :]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, max_prompt_tokens: int, max_completion_tokens: int
) -> TokenizedPair:
    return TokenizedPair(
        prompt_ids=encode_prompt(tokenizer, pair.prompt_text, max_prompt_tokens),
        chosen_ids=encode_completion(tokenizer, pair.chosen_text, max_completion_tokens),
        rejected_ids=encode_completion(tokenizer, pair.rejected_text, max_completion_tokens),
    )


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    seqs = [(it.prompt_ids, it.chosen_ids) for it in items] + [(it.prompt_ids, it.rejected_ids) for it in items]
    return PairBatch(*collate_sequences(seqs, pad_id))


def pair_logps(model: torch.nn.Module, batch: PairBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,), (B,) summed completion log-probs of chosen and rejected."""
    logps = completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, dtype=dtype)
    return logps[: batch.n_pairs], logps[batch.n_pairs :]


@torch.no_grad()
def score_pairs(
    model: PeftModel,
    items: Sequence[TokenizedPair],
    *,
    mode: str,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    parallel: DataParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs, (M,) each, of M pairs under one adapter mode (no grad).

    With `parallel`, every rank passes the same items, scores its share, and gets all M (a few
    floats per pair cross the wire, not a forward pass)."""
    if parallel is not None:
        kw: dict[str, Any] = {"mode": mode, "pad_id": pad_id, "device": device, "dtype": dtype}
        mine = torch.stack(score_pairs(model, parallel.shard(items), batch_size=batch_size, **kw))
        full = parallel.gather_shards(mine, len(items))
        return full[0], full[1]
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with adapter_mode(model, mode):
            for start in range(0, len(items), batch_size):
                batch = collate_pairs(items[start : start + batch_size], pad_id).to(device)
                c, r = pair_logps(model, batch, dtype)
                chosen.append(c.cpu())
                rejected.append(r.cpu())
    finally:
        model.train(was_training)
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class StepLog:
    step: int
    loss: float
    accuracy: float
    margin: float


def dpo_step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[PairBatch, torch.Tensor, torch.Tensor]],
    cfg: DPOConfig,
    dtype: torch.dtype,
    *,
    parallel: DataParallel | None = None,
    total: int | None = None,
) -> StepLog:
    """One optimizer step over micro-batches `(batch, ref_chosen (b,), ref_rejected (b,))`.

    Each micro-batch's mean loss is weighted by its share of the step's pairs, so accumulation
    gives the same gradient as one big batch. With `parallel` the micro-batches are this rank's
    share of a global batch of `total` pairs: every pair's loss is divided by `total` (not by the
    rank's own count, which differs when the batch does not split evenly), and summing the ranks'
    gradients gives the single-process gradient of the global batch.
    """
    total = sum(b.n_pairs for b, _, _ in micro_batches) if total is None else total
    loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
    for batch, ref_c, ref_r in micro_batches:
        chosen, rejected = pair_logps(model, batch, dtype)
        len_c, len_r = batch.completion_lengths()
        out = preference_loss(
            chosen,
            rejected,
            ref_c,
            ref_r,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            loss_type=cfg.loss_type,
            chosen_lengths=len_c,
            rejected_lengths=len_r,
        )
        (out.losses.sum() / total).backward()
        loss_sum += float(out.losses.detach().sum())
        correct += float((out.margins > 0).sum())
        margin_sum += float(out.margins.sum())
    if parallel is not None:
        parallel.sum_gradients(trainable_parameters(model))
        sums = torch.tensor([loss_sum, correct, margin_sum], dtype=torch.float64)
        loss_sum, correct, margin_sum = parallel.sum(sums).tolist()
    apply_gradients(model, optimizer, cfg.max_grad_norm)
    return StepLog(step=0, loss=loss_sum / total, accuracy=correct / total, margin=margin_sum / total)


def train_dpo(
    model: PeftModel,
    items: Sequence[TokenizedPair],
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    cfg: DPOConfig,
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    on_step: Callable[[StepLog], None] | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult[StepLog]:
    """Train the active adapter of `model` in place.

    Args:
        items:        M tokenized training pairs.
        ref_chosen:   (M,) reference log-probs of the chosen completions (computed once).
        ref_rejected: (M,) same for the rejected completions.
        parallel:     data-parallel ranks, each holding the same items: every rank draws the same
                      global batches from the seeded order and trains its share of each.
    """
    if len(items) == 0:
        raise ValueError("no training pairs")
    if ref_chosen.shape != (len(items),) or ref_rejected.shape != (len(items),):
        raise ValueError(f"reference log-probs must have shape ({len(items)},)")

    def batches(gen: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(items), generator=gen).tolist()
        return [order[s : s + cfg.batch_size] for s in range(0, len(items), cfg.batch_size)]

    def step(optimizer: torch.optim.Optimizer, idx: Sequence[int]) -> StepLog:
        mine = idx if parallel is None else parallel.shard(idx)
        micro = []
        for m in range(0, len(mine), cfg.micro_batch_size):
            sub = list(mine[m : m + cfg.micro_batch_size])
            batch = collate_pairs([items[i] for i in sub], pad_id).to(device)
            micro.append((batch, ref_chosen[sub].to(device), ref_rejected[sub].to(device)))
        return dpo_step(model, optimizer, micro, cfg, dtype, parallel=parallel, total=len(idx))

    return run_epochs(
        model, cfg, examples=len(items), batches=batches, step=step, desc="dpo", progress=progress, on_step=on_step,
        postfix=lambda s: {"loss": f"{s.loss:.4f}", "acc": f"{s.accuracy:.2f}"},
    )  # fmt: skip
