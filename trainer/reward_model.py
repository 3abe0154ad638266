"""The reward model: a LoRA adapter plus a scalar score head on the served base model.

r(prompt, completion) is the score head applied to the last real token's final hidden state (the
EOS when the completion ended, the last kept token when it was cut). The adapter and the head are
saved together in peft's layout (the head as a `modules_to_save` module), so a reward model is a
registry entry like a policy, of kind `reward`, which the server refuses to serve.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .accounting import count_tokens
from .config import ComputeConfig, RewardConfig
from .dataset import PointwiseExample
from .dpo import collate_sequences, encode_completion
from .model import autocast, trainable_parameters
from .reward_losses import bradley_terry_loss, centering_penalty, ordered_thresholds, ordinal_loss, thumbs_loss
from .rows import PreferencePair

log = logging.getLogger(__name__)

Sequence_ = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, completion ids)
RATING_LEVELS = 5


def load_reward_backbone(model_dir: Path, compute: ComputeConfig, dtype: torch.dtype, pad_id: int) -> Any:
    # A causal LM's checkpoint has no score head by design (it is new, or comes with the adapter):
    # transformers' "newly initialized ... consider training" report would only be noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=1, dtype=dtype, local_files_only=True,
            attn_implementation=compute.attn_implementation,
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id
    count_tokens(model)
    return model


def build_reward_model(
    model_dir: Path, cfg: RewardConfig, compute: ComputeConfig, device: torch.device, dtype: torch.dtype, pad_id: int
) -> PeftModel:
    """A fresh LoRA + score head, initialised from `cfg.reward_seed`."""
    torch.manual_seed(cfg.reward_seed)
    lora = LoraConfig(
        r=cfg.reward_lora_r,
        lora_alpha=cfg.reward_lora_alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.reward_lora_targets),
        bias="none",
        task_type="SEQ_CLS",  # peft then saves the score head with the adapter (modules_to_save)
    )
    return get_peft_model(load_reward_backbone(model_dir, compute, dtype, pad_id), lora).to(device)


def load_reward_model(
    model_dir: Path, adapter_dir: Path, compute: ComputeConfig, device: torch.device, dtype: torch.dtype, pad_id: int
) -> PeftModel:
    """A published reward model, frozen, in eval mode."""
    base = load_reward_backbone(model_dir, compute, dtype, pad_id)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).to(device)
    return model.eval()


def head_scores(
    model: PeftModel, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(K,) float32 outputs of the scalar head at positions (rows[k], cols[k]) of right-padded (N, T)
    sequences: the backbone runs once over the batch, the head only where it is read (the last
    real token for a reward, every completion-predicting state for a critic's values)."""
    inner: Any = model.get_base_model()  # a *ForSequenceClassification: .model the backbone, .score the head
    with autocast(ids.device, dtype):
        hidden = inner.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return inner.score(hidden[rows, cols]).squeeze(-1).float()


def sequence_rewards(model: PeftModel, ids: torch.Tensor, attn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N,) float32 rewards of right-padded sequences, read at each row's last real token.

    Pooling here rather than in the transformers head: that one finds the end by the pad id,
    which is the EOS for many chat models, so it would skip the EOS of every finished reply.
    """
    rows = torch.arange(ids.shape[0], device=ids.device)
    return head_scores(model, ids, attn, rows, attn.sum(dim=1) - 1, dtype)


@torch.no_grad()
def reward_scores(
    model: PeftModel,
    seqs: Sequence[Sequence_],
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N,) rewards of (prompt, completion) token sequences."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(seqs), batch_size):
            ids, attn, _ = collate_sequences(seqs[i : i + batch_size], pad_id)
            out.append(sequence_rewards(model, ids.to(device), attn.to(device), dtype).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# -- examples --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairItem:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    margin: float


@dataclass(frozen=True)
class PointItem:
    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    kind: str  # "thumbs" or "rating"
    value: float  # +1/-1 for thumbs, 1..5 for a rating


Item = PairItem | PointItem


class Encoder:
    """Token ids for the reward model, cut the way the policy trainer cuts them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: RewardConfig) -> None:
        self.tok, self.cfg = tokenizer, cfg

    def prompt(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"][-self.cfg.reward_max_prompt_tokens :])

    def completion(self, text: str) -> tuple[int, ...]:
        return encode_completion(self.tok, text, self.cfg.reward_max_completion_tokens)

    def pair(self, p: PreferencePair, margin: float = 0.0) -> PairItem:
        return PairItem(
            self.prompt(p.prompt_text), self.completion(p.chosen_text), self.completion(p.rejected_text), margin
        )

    def point(self, e: PointwiseExample) -> PointItem:
        return PointItem(self.prompt(e.prompt_text), self.completion(e.completion_text), e.kind, e.value)


def rating_margins(
    pairs: Sequence[PreferencePair], examples: Sequence[PointwiseExample], per_point: float
) -> list[float]:
    """The Bradley-Terry margin of each pair: `per_point` x the mean-rating gap for pairs made
    from ratings, 0 for every other pair (and for all when `per_point` is 0)."""
    if per_point == 0.0:
        return [0.0] * len(pairs)
    sums: dict[str, list[float]] = {}
    for e in examples:
        if e.kind == "rating":
            sums.setdefault(e.completion_id, []).append(e.value)
    means = {k: sum(v) / len(v) for k, v in sums.items()}
    out = []
    for p in pairs:
        a, b = means.get(p.chosen_completion_id), means.get(p.rejected_completion_id)
        out.append(per_point * (a - b) if p.source == "rating" and a is not None and b is not None else 0.0)
    return out


# -- training --------------------------------------------------------------------------------
@dataclass
class RewardHeads:
    """The reward scale's learned anchors: where a thumbs up begins, and the rating thresholds."""

    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    first: torch.Tensor = field(default_factory=lambda: torch.tensor(-1.5, requires_grad=True))
    # softplus(0.5413) = 1: thresholds start one reward unit apart.
    gaps: torch.Tensor = field(default_factory=lambda: torch.full((RATING_LEVELS - 2,), 0.5413, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        return [self.anchor, self.first, self.gaps]

    def thresholds(self) -> torch.Tensor:
        return ordered_thresholds(self.first, self.gaps)

    def to_dict(self) -> dict[str, Any]:
        return {"thumbs_anchor": self.anchor.item(), "rating_thresholds": self.thresholds().detach().tolist()}


@dataclass
class RewardTrainResult:
    steps: int
    seconds: float
    losses: list[float]

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def batch_loss(
    model: PeftModel, batch: Sequence[Item], heads: RewardHeads, cfg: RewardConfig, *, pad_id: int,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """One loss over a mixed batch: every sequence goes through the model once."""
    seqs: list[Sequence_] = []
    for it in batch:
        if isinstance(it, PairItem):
            seqs += [(it.prompt, it.chosen), (it.prompt, it.rejected)]
        else:
            seqs.append((it.prompt, it.completion))
    ids, attn, _ = collate_sequences(seqs, pad_id)
    rewards = sequence_rewards(model, ids.to(device), attn.to(device), dtype)
    chosen, rejected, margins, thumbs, ups, rated, ratings = [], [], [], [], [], [], []
    i = 0
    for it in batch:
        if isinstance(it, PairItem):
            chosen.append(rewards[i])
            rejected.append(rewards[i + 1])
            margins.append(it.margin)
            i += 2
        else:
            if it.kind == "thumbs":
                thumbs.append(rewards[i])
                ups.append(it.value > 0)
            else:
                rated.append(rewards[i])
                ratings.append(int(round(it.value)))
            i += 1
    loss = centering_penalty(rewards, cfg.reward_center_coefficient)
    if chosen:
        loss = loss + bradley_terry_loss(torch.stack(chosen), torch.stack(rejected), torch.tensor(margins))
    if thumbs:
        loss = loss + cfg.reward_thumbs_weight * thumbs_loss(torch.stack(thumbs), torch.tensor(ups), heads.anchor)
    if rated:
        loss = loss + cfg.reward_ratings_weight * ordinal_loss(
            torch.stack(rated), torch.tensor(ratings), heads.thresholds()
        )
    return loss


def train_reward_model(
    model: PeftModel,
    items: Sequence[Item],
    heads: RewardHeads,
    cfg: RewardConfig,
    *,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    on_step: Callable[[float], None] | None = None,
) -> RewardTrainResult:
    """AdamW over LoRA + head (and the anchors, at a higher rate: they are single numbers that must
    travel whole reward units), shuffled mixed batches, gradient clipping."""
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(
        [
            {"params": params, "lr": cfg.reward_learning_rate, "weight_decay": 0.0},
            {"params": heads.parameters(), "lr": cfg.reward_anchor_learning_rate, "weight_decay": 0.0},
        ]
    )
    rng = random.Random(cfg.reward_seed)
    order = list(range(len(items)))
    steps_per_epoch = math.ceil(len(items) / cfg.reward_batch_size)
    bar = tqdm(total=steps_per_epoch * cfg.reward_epochs, desc="reward model", disable=not progress, unit="step")
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.reward_epochs):
        rng.shuffle(order)
        for s in range(0, len(order), cfg.reward_batch_size):
            batch = [items[j] for j in order[s : s + cfg.reward_batch_size]]
            loss = batch_loss(model, batch, heads, cfg, pad_id=pad_id, device=device, dtype=dtype)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + heads.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if on_step:
                on_step(losses[-1])
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    bar.close()
    model.eval()
    return RewardTrainResult(len(losses), time.perf_counter() - t0, losses)
