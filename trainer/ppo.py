"""The PPO loop on a LoRA policy against a learned reward model.

Four roles, three models on the same base weights:
  * the policy: the trainable LoRA adapter (`TRAINED`) in a PeftModel whose reference is the base
    model (adapter disabled) or, when rounds chain, a frozen copy of the served adapter (`SERVED`);
  * the reward model: frozen, scores each finished rollout once;
  * the critic: a copy of the reward model (its LoRA and score head) trained as a per-token value
    function, so it starts knowing what a good reply looks like.

Each iteration samples replies to prompts users actually sent (plain temperature sampling), scores
them, shapes per-token rewards (score at the last token, KL penalty on every token), computes GAE
advantages, and runs a few epochs of clipped policy and value updates over minibatches. The pure
pieces are in `ppo_losses.py`; everything here is the data flow between them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import PPOConfig
from .dpo import collate_sequences
from .gate import sample_completions
from .losses import completion_positions, gathered_token_logps
from .model import TRAINED, adapter_mode, autocast, trainable_parameters
from .ppo_losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    shape_rewards,
)
from .reward_model import head_scores

log = logging.getLogger(__name__)

Seq = tuple[tuple[int, ...], tuple[int, ...]]


# -- per-token views of a batch ----------------------------------------------------------------
def completion_grid(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map the K completion-predicting positions of a right-padded (N, T) batch onto an (N, L)
    grid, L the longest completion: returns rows, cols (the positions), slots (index within the
    completion) and the (N, L) 0/1 mask."""
    rows, cols = completion_positions(completion_mask)
    starts = torch.full((completion_mask.shape[0],), completion_mask.shape[1], dtype=torch.long)
    starts = starts.to(cols.device).scatter_reduce(0, rows, cols, reduce="amin")
    slots = cols - starts[rows]
    lengths = completion_mask[:, 1:].sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    mask = (torch.arange(width, device=completion_mask.device)[None, :] < lengths[:, None]).long()
    return rows, cols, slots, mask


def _to_grid(values: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    grid = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return grid.index_put((rows, slots), values)


def policy_token_logps(
    model: PeftModel,
    ids: torch.Tensor,
    attn: torch.Tensor,
    comp: torch.Tensor,
    dtype: torch.dtype,
    *,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, L) log-probs of each completion token under the model's active adapter (and, if asked,
    the (N, L) entropy of the distribution it was drawn from). The LM head runs on completion
    positions only."""
    lm: Any = model.get_base_model()  # a transformers causal LM, which torch types as Module
    rows, cols, slots, mask = completion_grid(comp)
    with autocast(ids.device, dtype):
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[rows, cols])
    logps = gathered_token_logps(logits, ids[rows, cols + 1]).float()
    shape = (ids.shape[0], mask.shape[1])
    ent = _to_grid(entropy_from_logits(logits.detach()), rows, slots, shape) if entropy else None
    return _to_grid(logps, rows, slots, shape), ent


def critic_values(
    critic: PeftModel, ids: torch.Tensor, attn: torch.Tensor, comp: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(N, L) V(s_t): the critic's score head on the state that predicts each completion token."""
    rows, cols, slots, mask = completion_grid(comp)
    return _to_grid(head_scores(critic, ids, attn, rows, cols, dtype), rows, slots, (ids.shape[0], mask.shape[1]))


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class IterationStats:
    """The standard PPO figures of one iteration (means over its rollouts / tokens)."""

    iteration: int
    score: float  # raw reward-model score
    shaped_score: float  # normalised, clipped, EOS-penalised
    kl: float  # nats per reply, to the reference
    kl_per_token: float
    entropy: float
    non_score_reward: float
    kl_coef: float
    approx_kl: float
    clip_fraction: float
    value_clip_fraction: float
    policy_loss: float
    value_loss: float
    ratio: float
    ended: float  # share of replies that ended with EOS
    reply_tokens: float
    rollout_seconds: float
    score_seconds: float
    reference_seconds: float
    update_seconds: float


@dataclass
class PPOResult:
    iterations: list[IterationStats] = field(default_factory=list)
    stop_reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"stop_reason": self.stop_reason, "seconds": self.seconds,
                "iterations": [asdict(s) for s in self.iterations]}  # fmt: skip


@dataclass
class RewardScorer:
    """The frozen reward model and the scale it was trained on."""

    score: Callable[[Sequence[Seq]], torch.Tensor]  # (N,) raw scores
    mean: float
    std: float


def train_ppo(
    policy: PeftModel,
    critic: PeftModel,
    reward: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[int, ...]],
    cfg: PPOConfig,
    *,
    reference: str,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    on_iteration: Callable[[IterationStats], None] | None = None,
) -> PPOResult:
    """Run PPO until ppo_iterations, the wall-clock budget or the KL ceiling, whichever first."""
    if not prompts:
        raise ValueError("PPO needs prompts to roll out")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy_params = trainable_parameters(policy)
    critic_params = trainable_parameters(critic)
    popt = torch.optim.AdamW(policy_params, lr=cfg.ppo_learning_rate, weight_decay=0.0)
    vopt = torch.optim.AdamW(critic_params, lr=cfg.ppo_value_learning_rate, weight_decay=0.0)
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(cfg.ppo_kl_coef, cfg.ppo_target_kl, horizon=10_000)
        if cfg.ppo_target_kl > 0
        else FixedKLController(cfg.ppo_kl_coef)
    )
    rng = random.Random(cfg.ppo_seed)
    result = PPOResult()
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.ppo_iterations, desc="ppo", unit="iter", disable=not progress)
    for it in range(cfg.ppo_iterations):
        if (time.perf_counter() - t_start) / 60 >= cfg.ppo_max_minutes:
            result.stop_reason = f"wall-clock budget of {cfg.ppo_max_minutes:g} min reached"
            break
        batch_prompts = [prompts[rng.randrange(len(prompts))] for _ in range(cfg.ppo_prompts_per_iteration)]
        stats = _iteration(
            it, policy, critic, reward, tokenizer, batch_prompts, cfg, kl_ctl, popt, vopt,
            reference=reference, pad=pad, eos=eos, seed=cfg.ppo_seed * 1_000_003 + it, device=device, dtype=dtype,
        )  # fmt: skip
        result.iterations.append(stats)
        if on_iteration:
            on_iteration(stats)
        bar.set_postfix(score=f"{stats.score:+.3f}", kl=f"{stats.kl_per_token:.3f}", ent=f"{stats.entropy:.2f}",
                        clip=f"{stats.clip_fraction:.2f}")  # fmt: skip
        bar.update()
        if stats.kl_per_token > cfg.ppo_kl_ceiling:
            result.stop_reason = (
                f"KL ceiling reached: {stats.kl_per_token:.3f} > ppo_kl_ceiling {cfg.ppo_kl_ceiling:g} nats/token"
            )
            break
    else:
        result.stop_reason = f"{cfg.ppo_iterations} iterations done"
    bar.close()
    result.seconds = time.perf_counter() - t_start
    policy.eval()
    return result


def _iteration(
    it: int,
    policy: PeftModel,
    critic: PeftModel,
    reward: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[int, ...]],
    cfg: PPOConfig,
    kl_ctl: FixedKLController | AdaptiveKLController,
    popt: torch.optim.Optimizer,
    vopt: torch.optim.Optimizer,
    *,
    reference: str,
    pad: int,
    eos: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> IterationStats:
    t0 = time.perf_counter()
    seqs = sample_completions(
        policy, tokenizer, prompts, mode=TRAINED, n=cfg.ppo_samples_per_prompt, max_new_tokens=cfg.ppo_max_new_tokens,
        temperature=cfg.ppo_temperature, seed=seed, device=device, dtype=dtype,
    )  # fmt: skip
    seqs = [(p, c) for p, c in seqs if c]  # an empty reply has no token to learn from
    ended = torch.tensor([c[-1] == eos for _, c in seqs])
    ids, attn, comp = (t.to(device) for t in collate_sequences(seqs, pad))
    t1 = time.perf_counter()
    with torch.no_grad():
        scores = reward.score(seqs).float().cpu()
    t2 = time.perf_counter()
    policy.eval()
    critic.eval()
    with torch.no_grad():
        old_logps, _ = policy_token_logps(policy, ids, attn, comp, dtype)
        with adapter_mode(policy, reference):
            ref_logps, _ = policy_token_logps(policy, ids, attn, comp, dtype)
        old_values = critic_values(critic, ids, attn, comp, dtype)
    t3 = time.perf_counter()
    mask = completion_grid(comp)[3].to(old_logps.device)
    shaped = shape_rewards(
        scores.to(old_logps.device), old_logps, ref_logps, mask, ended.to(old_logps.device), kl_coef=kl_ctl.value,
        score_mean=reward.mean, score_std=reward.std, score_clip=cfg.ppo_score_clip,
        missing_eos_penalty=cfg.ppo_missing_eos_penalty,
    )  # fmt: skip
    advantages, returns = gae(shaped.rewards, old_values, mask, gamma=cfg.ppo_gamma, lam=cfg.ppo_lam)
    advantages = masked_whiten(advantages, mask)

    policy.train()
    critic.train()
    rng = random.Random(seed)
    order = list(range(len(seqs)))
    logs: dict[str, list[float]] = {k: [] for k in ("approx_kl", "clip", "vclip", "ploss", "vloss", "ratio", "ent")}
    for _ in range(cfg.ppo_epochs):
        rng.shuffle(order)
        for s in range(0, len(order), cfg.ppo_minibatch_size):
            idx = torch.tensor(order[s : s + cfg.ppo_minibatch_size])
            sub = idx.to(device)
            # Re-pad the minibatch to its own longest sequence: the grid width follows it.
            width = int(attn[sub].sum(1).max())
            mb_ids, mb_attn, mb_comp = ids[sub, :width], attn[sub, :width], comp[sub, :width]
            logps, ent = policy_token_logps(policy, mb_ids, mb_attn, mb_comp, dtype, entropy=True)
            cols = logps.shape[1]
            m = mask[idx, :cols]
            out = clipped_policy_loss(logps, old_logps[idx, :cols], advantages[idx, :cols], m, clip=cfg.ppo_clip)
            popt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(policy), 1.0)
            popt.step()
            values = critic_values(critic, mb_ids, mb_attn, mb_comp, dtype)
            vout = clipped_value_loss(values, old_values[idx, :cols], returns[idx, :cols], m, clip=cfg.ppo_value_clip)
            vopt.zero_grad(set_to_none=True)
            vout.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(critic), 1.0)
            vopt.step()
            logs["approx_kl"].append(out.approx_kl.item())
            logs["clip"].append(out.clip_fraction.item())
            logs["vclip"].append(vout.clip_fraction.item())
            logs["ploss"].append(out.loss.item())
            logs["vloss"].append(vout.loss.item())
            logs["ratio"].append(out.ratio.item())
            assert ent is not None
            logs["ent"].append(masked_mean(ent, m).item())
    t4 = time.perf_counter()
    kl_seq = shaped.kl.sum(1)
    tokens = mask.sum(1).float()
    kl_coef = kl_ctl.value
    kl_ctl.update(float(kl_seq.mean()), len(seqs))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    return IterationStats(
        iteration=it,
        score=float(scores.mean()),
        shaped_score=float(shaped.score.mean()),
        kl=float(kl_seq.mean()),
        kl_per_token=float(kl_seq.sum() / tokens.sum().clamp_min(1)),
        entropy=mean(logs["ent"]),
        non_score_reward=float(shaped.non_score_reward.mean()),
        kl_coef=kl_coef,
        approx_kl=mean(logs["approx_kl"]),
        clip_fraction=mean(logs["clip"]),
        value_clip_fraction=mean(logs["vclip"]),
        policy_loss=mean(logs["ploss"]),
        value_loss=mean(logs["vloss"]),
        ratio=mean(logs["ratio"]),
        ended=float(ended.float().mean()),
        reply_tokens=float(tokens.mean()),
        rollout_seconds=t1 - t0,
        score_seconds=t2 - t1,
        reference_seconds=t3 - t2,
        update_seconds=t4 - t3,
    )
