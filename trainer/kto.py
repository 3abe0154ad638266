"""The KTO loop on a LoRA adapter, and its held-out scorer for the gate (arXiv 2402.01306).

Built like the DPO loop (`trainer/dpo.py`): completion-token log-probs only, reference log-probs
computed once per run, bf16 autocast where the hardware has it, micro-batches that accumulate to
the gradient of one big batch. What KTO adds is the reference point z0, estimated from mismatched
(prompt, completion) pairs: as in TRL's `KTOTrainer`, the batches are fixed for the run and each
example's mismatched completion is its batch neighbour's (TRL's rotation by one), so the
reference log-probs of the mismatched pairs are computed once too. z0 is taken over the whole
step's batch before its micro-batches run (no gradient flows through it), so accumulation does
not change it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import DPOConfig, GateConfig
from .dataset import PointwiseExample
from .gate import GateMetrics, evaluate_samples
from .kto_losses import kto_loss, kto_reference_point
from .model import SERVED, TRAINED, encode_completion, encode_prompt, score_sequences, sequence_logps
from .optim import TrainResult, apply_gradients, run_epochs
from .reward_gate import auc


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    desirable: bool


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: PointwiseExample,
    desirable: bool,
    max_prompt_tokens: int,
    max_completion_tokens: int,
) -> TokenizedExample:
    return TokenizedExample(
        prompt_ids=encode_prompt(tokenizer, example.prompt_text, max_prompt_tokens),
        completion_ids=encode_completion(tokenizer, example.completion_text, max_completion_tokens),
        desirable=desirable,
    )


def fixed_batches(desirable: Sequence[bool], batch_size: int, seed: int) -> list[list[int]]:
    """Example indices in batches of `batch_size`, fixed for the run (the mismatched pairs of z0
    stay within a batch, so their reference log-probs are computed once).

    Each class is shuffled (seeded) and spread evenly through the order before it is cut, so
    every batch holds both classes in about their overall proportion whenever the rarer class has
    an example per batch: a batch of one class would estimate z0 from replies as good (or as bad)
    as its own, and learn nothing from their difference. A last batch of one joins the one before
    it: alone it would have no mismatched pair.
    """
    n = len(desirable)
    if n < 2 or batch_size < 2:
        raise ValueError(f"KTO needs at least 2 examples and batches of at least 2, got {n} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    placed: list[tuple[float, int]] = []
    for label in (True, False):
        members = [i for i, d in enumerate(desirable) if d == label]
        for k, j in enumerate(torch.randperm(len(members), generator=gen).tolist()):
            placed.append(((k + 0.5) / len(members), members[j]))  # evenly spaced in [0, 1)
    order = [i for _, i in sorted(placed)]
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] += last
    return batches


def mismatched_partners(batches: Sequence[Sequence[int]], n: int) -> list[int]:
    """For each of n examples, the example whose completion it is paired with for z0: TRL's
    rotation by one within the batch, (x_1, y_k), (x_2, y_1), ..., (x_k, y_{k-1})."""
    partners = [-1] * n
    for batch in batches:
        for k, i in enumerate(batch):
            partners[i] = batch[k - 1]
    if -1 in partners:
        raise ValueError("every example must be in exactly one batch")
    return partners


@dataclass(frozen=True)
class KTOData:
    """A run's M training examples, their fixed batches and mismatched partners, and the
    reference log-probs of both (M,), computed once."""

    items: list[TokenizedExample]
    batches: list[list[int]]
    partners: list[int]
    ref_logps: torch.Tensor
    ref_kl_logps: torch.Tensor

    def matched(self, idx: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(self.items[i].prompt_ids, self.items[i].completion_ids) for i in idx]

    def mismatched(self, idx: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(self.items[i].prompt_ids, self.items[self.partners[i]].completion_ids) for i in idx]

    @property
    def n_desirable(self) -> int:
        return sum(1 for it in self.items if it.desirable)


def prepare_kto(
    model: PeftModel,
    items: list[TokenizedExample],
    cfg: DPOConfig,
    *,
    reference: str,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> KTOData:
    """Fix the batches and partners, and score matched and mismatched pairs under `reference`."""
    batches = fixed_batches([it.desirable for it in items], cfg.batch_size, cfg.seed)
    partners = mismatched_partners(batches, len(items))
    unscored = KTOData(items, batches, partners, ref_logps=torch.zeros(0), ref_kl_logps=torch.zeros(0))
    every = range(len(items))
    kw: dict[str, Any] = {"mode": reference, "pad_id": pad_id, "device": device, "dtype": dtype}
    return replace(
        unscored,
        ref_logps=score_sequences(model, unscored.matched(every), batch_size=cfg.micro_batch_size, **kw),
        ref_kl_logps=score_sequences(model, unscored.mismatched(every), batch_size=cfg.micro_batch_size, **kw),
    )


@dataclass
class KTOStepLog:
    step: int
    loss: float
    kl: float  # z0, the step's reference point
    desirable_reward: float  # mean beta * log(pi / pi_ref) of the step's desirable examples (nan if none)
    undesirable_reward: float


def kto_step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    data: KTOData,
    idx: Sequence[int],
    cfg: DPOConfig,
    *,
    beta: float,
    weights: tuple[float, float],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> KTOStepLog:
    """One optimizer step on the examples `idx` (one fixed batch), in micro-batches of
    `cfg.micro_batch_size`; each micro-batch's loss sum is divided by the batch size, so the
    gradient is that of the batch mean. `weights` are (lambda_D, lambda_U)."""
    kw: dict[str, Any] = {"pad_id": pad_id, "device": device, "dtype": dtype}
    micro = [list(idx[m : m + cfg.micro_batch_size]) for m in range(0, len(idx), cfg.micro_batch_size)]
    with torch.no_grad():
        policy_kl = torch.cat([sequence_logps(model, data.mismatched(sub), **kw) for sub in micro])
    z0 = kto_reference_point(policy_kl, data.ref_kl_logps[list(idx)].to(device))
    loss_sum = 0.0
    rewards: dict[bool, list[float]] = {True: [], False: []}
    for sub in micro:
        logps = sequence_logps(model, data.matched(sub), **kw)
        desirable = torch.tensor([data.items[i].desirable for i in sub], device=device)
        out = kto_loss(
            logps, data.ref_logps[sub].to(device), desirable, z0, beta=beta, desirable_weight=weights[0],
            undesirable_weight=weights[1],
        )  # fmt: skip
        (out.losses.sum() / len(idx)).backward()
        loss_sum += float(out.losses.detach().sum())
        for d, r in zip(desirable.tolist(), out.rewards.tolist(), strict=True):
            rewards[d].append(r)
    apply_gradients(model, optimizer, cfg.max_grad_norm)
    return KTOStepLog(
        step=0,
        loss=loss_sum / len(idx),
        kl=float(z0),
        desirable_reward=statistics.fmean(rewards[True]) if rewards[True] else math.nan,
        undesirable_reward=statistics.fmean(rewards[False]) if rewards[False] else math.nan,
    )


def train_kto(
    model: PeftModel,
    data: KTOData,
    cfg: DPOConfig,
    *,
    beta: float,
    weights: tuple[float, float],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    on_step: Callable[[KTOStepLog], None] | None = None,
) -> TrainResult[KTOStepLog]:
    """Train the active adapter of `model` in place: `cfg.epochs` passes over `data`'s fixed
    batches, in a seeded order per epoch."""
    if data.ref_logps.shape != (len(data.items),) or data.ref_kl_logps.shape != (len(data.items),):
        raise ValueError(f"reference log-probs must have shape ({len(data.items)},)")

    def batches(gen: torch.Generator) -> list[list[int]]:
        return [data.batches[b] for b in torch.randperm(len(data.batches), generator=gen).tolist()]

    def step(optimizer: torch.optim.Optimizer, idx: Sequence[int]) -> KTOStepLog:
        return kto_step(
            model, optimizer, data, idx, cfg, beta=beta, weights=weights, pad_id=pad_id, device=device, dtype=dtype
        )

    return run_epochs(
        model, cfg, examples=len(data.items), batches=batches, step=step, desc="kto", progress=progress,
        on_step=on_step, postfix=lambda s: {"loss": f"{s.loss:.4f}", "kl": f"{s.kl:.3f}"},
    )  # fmt: skip


# -- the gate's held-out scorer -----------------------------------------------------------------
def reward_auc(rewards: Sequence[float], desirable: Sequence[bool]) -> tuple[float | None, float | None]:
    """The AUC of implicit rewards between desirable and undesirable examples (the chance a random
    desirable one scores above a random undesirable one, ties half), and the gap of their means;
    (None, None) without both classes."""
    good = [r for r, d in zip(rewards, desirable, strict=True) if d]
    bad = [r for r, d in zip(rewards, desirable, strict=True) if not d]
    if not good or not bad:
        return None, None
    return auc(rewards, desirable), statistics.fmean(good) - statistics.fmean(bad)


def evaluate_kto(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Sequence[TokenizedExample],
    cfg: GateConfig,
    *,
    beta: float,
    reference: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> GateMetrics:
    """KTO's gate figures: the AUC of the implicit reward beta * log(pi / pi_base) between held-out
    desirable and undesirable examples (and the served adapter's, if loaded), plus the shared
    sample checks against `reference`.

    As in DPO's gate, the implicit reward is measured against the base model, so the candidate's
    and the served adapter's figures are on one scale when rounds chain.
    """
    kw: dict[str, Any] = {"pad_id": tokenizer.pad_token_id, "device": device, "dtype": dtype}
    seqs = [(it.prompt_ids, it.completion_ids) for it in heldout]
    labels = [it.desirable for it in heldout]
    base = score_sequences(model, seqs, mode="base", **kw)

    def scored(mode: str) -> tuple[float | None, float | None]:
        return reward_auc((beta * (score_sequences(model, seqs, mode=mode, **kw) - base)).tolist(), labels)

    cand_auc, cand_gap = scored(TRAINED)
    served_auc, served_gap = scored(SERVED) if SERVED in model.peft_config else (None, None)
    fields, _ = evaluate_samples(
        model, tokenizer, [it.prompt_ids for it in heldout], cfg, reference=reference, seed=seed, device=device,
        dtype=dtype,
    )  # fmt: skip
    n_desirable = sum(labels)
    return GateMetrics(
        heldout_pairs=0, accuracy=None, margin=None, served_accuracy=None, served_margin=None,
        heldout_desirable=n_desirable, heldout_undesirable=len(labels) - n_desirable, reward_auc=cand_auc,
        reward_gap=cand_gap, served_reward_auc=served_auc, served_reward_gap=served_gap, **fields,
    )  # fmt: skip
