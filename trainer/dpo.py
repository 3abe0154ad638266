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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import DPOConfig
from .losses import preference_loss
from .model import adapter_mode, completion_logps, trainable_parameters
from .rows import PreferencePair

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


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[int, ...]:
    """Completion tokens, ended with EOS unless the text had to be cut (a cut answer did not end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens:
        return (*ids, tokenizer.eos_token_id)
    return tuple(ids[:max_tokens])


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, max_prompt_tokens: int, max_completion_tokens: int
) -> TokenizedPair:
    """The prompt is the chat-templated text as served; the end of a long prompt is kept because
    it holds the question being answered."""
    prompt = tokenizer(pair.prompt_text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    return TokenizedPair(
        prompt_ids=tuple(prompt),
        chosen_ids=encode_completion(tokenizer, pair.chosen_text, max_completion_tokens),
        rejected_ids=encode_completion(tokenizer, pair.rejected_text, max_completion_tokens),
    )


def collate_sequences(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, completion) token lists -> input_ids, attention_mask, completion_mask, each (N, T),
    right-padded to the longest sequence."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor((*p, *c))
        attn[i, :n] = 1
        comp[i, len(p) : n] = 1
    return ids, attn, comp


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs, (M,) each, of M pairs under one adapter mode (no grad)."""
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


@dataclass
class TrainResult:
    steps: int
    examples: int
    seconds: float
    log: list[StepLog] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.log[0].loss if self.log else math.nan

    @property
    def last_loss(self) -> float:
        return self.log[-1].loss if self.log else math.nan


def dpo_step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[PairBatch, torch.Tensor, torch.Tensor]],
    cfg: DPOConfig,
    dtype: torch.dtype,
) -> StepLog:
    """One optimizer step over micro-batches `(batch, ref_chosen (b,), ref_rejected (b,))`.

    Each micro-batch's mean loss is weighted by its share of the step's pairs, so accumulation
    gives the same gradient as one big batch.
    """
    total = sum(b.n_pairs for b, _, _ in micro_batches)
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
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
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
) -> TrainResult:
    """Train the active adapter of `model` in place.

    Args:
        items:        M tokenized training pairs.
        ref_chosen:   (M,) reference log-probs of the chosen completions (computed once).
        ref_rejected: (M,) same for the rejected completions.
    """
    if len(items) == 0:
        raise ValueError("no training pairs")
    if ref_chosen.shape != (len(items),) or ref_rejected.shape != (len(items),):
        raise ValueError(f"reference log-probs must have shape ({len(items)},)")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; is the adapter loaded as trainable?")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    result = TrainResult(steps=0, examples=len(items), seconds=0.0)
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="dpo", unit="step", disable=not progress, leave=False)
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            for s in range(steps_per_epoch):
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                micro = []
                for m in range(0, len(idx), cfg.micro_batch_size):
                    sub = idx[m : m + cfg.micro_batch_size]
                    batch = collate_pairs([items[i] for i in sub], pad_id).to(device)
                    micro.append((batch, ref_chosen[sub].to(device), ref_rejected[sub].to(device)))
                step = dpo_step(model, optimizer, micro, cfg, dtype)
                result.steps += 1
                step.step = result.steps
                result.log.append(step)
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4f}", acc=f"{step.accuracy:.2f}")
                if on_step is not None:
                    on_step(step)
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - start
    return result
