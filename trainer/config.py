"""Trainer configuration: dataclasses with help text, checked in `__post_init__`.

Every field carries its help in `metadata["help"]`; `tuneloop.cli.trainer` builds its flags from
these, so a setting is described once. Field names are unique across the sections so each has one
flat flag (`--beta`, `--min-accuracy`, ...).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.server.errors import InvalidArgument
from tuneloop.server.settings import setting

if TYPE_CHECKING:
    from tuneloop.server.registry import Registry


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidArgument(msg)


@dataclass
class DatasetConfig:
    """How feedback becomes preference pairs."""

    use_pairwise: bool = setting(True, "Use explicit pairwise choices between two completions.")
    use_thumbs: bool = setting(True, "Pair thumbs-up completions with thumbs-down ones of the same prompt.")
    use_ratings: bool = setting(True, "Pair completions of the same prompt whose mean ratings differ enough.")
    use_corrections: bool = setting(True, "Pair a user's correction (chosen) with the completion it corrects.")
    min_rating_gap: float = setting(2.0, "Smallest mean-rating gap (1-5 scale) that makes a rating pair.")
    max_pairs_per_rater: int = setting(64, "Cap on pairs any one rater contributes to a run.")
    heldout_fraction: float = setting(0.2, "Share of prompts held out for the evaluation gate (split by prompt).")
    split_salt: str = setting("tuneloop-v1", "Salt of the prompt hash that assigns held-out prompts.")

    def __post_init__(self) -> None:
        _check(self.min_rating_gap > 0, f"min_rating_gap must be > 0 (ties are never pairs), got {self.min_rating_gap}")
        _check(self.max_pairs_per_rater >= 1, f"max_pairs_per_rater must be >= 1, got {self.max_pairs_per_rater}")
        _check(0.0 < self.heldout_fraction < 1.0, f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(
            any((self.use_pairwise, self.use_thumbs, self.use_ratings, self.use_corrections)),
            "every pair source is disabled; enable at least one of use_pairwise/thumbs/ratings/corrections",
        )


LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("base", "served")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "eager")


@dataclass
class DPOConfig:
    """DPO on a LoRA adapter (arXiv 2305.18290; IPO: arXiv 2310.12036; cDPO label smoothing).

    Its reference, optimizer, token limits, LoRA shape and seed serve KTO too (`--algo kto`)."""

    loss_type: str = setting("sigmoid", "'sigmoid' (DPO, with optional label smoothing = cDPO) or 'ipo'.")
    beta: float = setting(0.1, "KL strength: higher keeps the policy closer to the reference (tau for IPO).")
    label_smoothing: float = setting(0.0, "Assumed label-flip rate for conservative DPO, in [0, 0.5).")
    reference: str = setting(
        "base",
        "Reference policy: 'base' (adapter disabled) or 'served' (start from and stay near the adapter "
        "now served, so rounds chain).",
    )
    learning_rate: float = setting(5e-4, "AdamW learning rate for the LoRA weights.")
    epochs: int = setting(2, "Passes over the training pairs (KTO: examples).")
    batch_size: int = setting(8, "Pairs (KTO: examples, at least 2) per optimizer step (after accumulation).")
    grad_accum: int = setting(1, "Micro-batches per optimizer step; batch_size must divide by it.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables).")
    max_prompt_tokens: int = setting(256, "Prompts are cut to their last this-many tokens.")
    max_completion_tokens: int = setting(256, "Completions are cut to their first this-many tokens.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = setting(0.0, "LoRA dropout.")
    lora_targets: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules that get LoRA.")
    seed: int = setting(0, "Seed for LoRA init and shuffling: the same seed and data give the same adapter.")

    def __post_init__(self) -> None:
        _check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        _check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _check(0.0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _check(
            not (self.loss_type == "ipo" and self.label_smoothing > 0),
            "label_smoothing applies to the sigmoid loss only; set it to 0 with loss_type='ipo'",
        )
        _check(self.reference in REFERENCES, f"reference must be one of {REFERENCES}, got {self.reference!r}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})",
        )
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _check(self.max_prompt_tokens >= 1 and self.max_completion_tokens >= 1, "token limits must be >= 1")
        _check(self.lora_r >= 1 and self.lora_alpha >= 1, "lora_r and lora_alpha must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(bool(self.lora_targets), "lora_targets must name at least one module")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def hyperparameters(self) -> dict[str, Any]:
        """What goes into the manifest and the run key."""
        return asdict(self)


@dataclass
class KTOConfig:
    """KTO on a LoRA adapter from unpaired thumbs and ratings (`--algo kto`, arXiv 2402.01306).

    The reference, optimizer, LoRA shape, token limits and seed are DPO's settings."""

    kto_beta: float = setting(
        0.1, "KTO beta: sharpness of the value function; higher keeps the policy nearer the reference."
    )
    kto_balance_classes: bool = setting(
        True,
        "Set the desirable and undesirable weights from the round's class counts so that "
        "lambda_D * n_D / (lambda_U * n_U) lies in [1, 4/3] (the paper's rule; the minority class is weighted up); "
        "off: use --kto-desirable-weight and --kto-undesirable-weight.",
    )
    kto_desirable_weight: float = setting(
        1.0, "lambda_D, the weight of desirable examples (with --no-kto-balance-classes)."
    )
    kto_undesirable_weight: float = setting(
        1.0, "lambda_U, the weight of undesirable examples (with --no-kto-balance-classes)."
    )
    kto_ratings_as_labels: bool = setting(
        True, "Ratings of 4-5 count as desirable and 1-2 as undesirable (3 is neither); off: thumbs only."
    )

    def __post_init__(self) -> None:
        _check(self.kto_beta > 0, f"kto_beta must be > 0, got {self.kto_beta}")
        _check(
            self.kto_desirable_weight > 0 and self.kto_undesirable_weight > 0,
            "kto_desirable_weight and kto_undesirable_weight must be > 0",
        )

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutoConfig:
    """How `--algo auto` picks each round's algorithm from the feedback at hand (`trainer/choose.py`)."""

    auto_min_pair_share: float = setting(
        0.5,
        "DPO when preference pairs make at least this share of pairs plus unpaired labelled thumbs and ratings; "
        "KTO otherwise.",
    )
    auto_ppo_min_ratings: int = setting(256, "PPO (reward model, then PPO) needs at least this many ratings...")
    auto_ppo_min_rating_values: int = setting(3, "...with at least this many distinct values (1-5)...")
    auto_ppo_min_rating_share: float = setting(
        0.5, "...making at least this share of the thumbs, ratings, pairwise choices and corrections."
    )

    def __post_init__(self) -> None:
        _check(0.0 <= self.auto_min_pair_share <= 1.0, "auto_min_pair_share must be in [0, 1]")
        _check(self.auto_ppo_min_ratings >= 1, f"auto_ppo_min_ratings must be >= 1, got {self.auto_ppo_min_ratings}")
        _check(1 <= self.auto_ppo_min_rating_values <= 5, "auto_ppo_min_rating_values must be in 1..5")
        _check(0.0 <= self.auto_ppo_min_rating_share <= 1.0, "auto_ppo_min_rating_share must be in [0, 1]")


@dataclass
class RewardConfig:
    """The reward model (`--algo reward`, and the first half of `--algo ppo`): how it trains, and
    its gate."""

    # Measured on bench/compare_algorithms.py's 512-event mixed log: 2 epochs at 3e-4 on attention
    # alone underfit it (held-out pairwise accuracy 0.56, thumbs AUC 0.51, refused by the gate);
    # 4 epochs at 1e-3 with the MLP adapted too reach 0.62-0.67 and pass.
    reward_learning_rate: float = setting(1e-3, "AdamW learning rate for the reward model's LoRA and score head.")
    reward_anchor_learning_rate: float = setting(
        1e-2, "Learning rate of the thumbs anchor and rating thresholds (single numbers on the reward scale)."
    )
    reward_epochs: int = setting(4, "Passes over the reward model's examples.")
    reward_batch_size: int = setting(8, "Examples (a pair counts as one) per optimizer step.")
    reward_max_prompt_tokens: int = setting(256, "Prompts are cut to their last this-many tokens.")
    reward_max_completion_tokens: int = setting(256, "Completions are cut to their first this-many tokens.")
    reward_lora_r: int = setting(8, "Reward model LoRA rank.")
    reward_lora_alpha: int = setting(16, "Reward model LoRA alpha.")
    reward_lora_targets: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Reward model LoRA modules."
    )
    reward_seed: int = setting(0, "Seed for the reward model's init and shuffling.")
    reward_rating_margin: float = setting(
        0.0, "Bradley-Terry margin per rating point for pairs made from rating gaps (0: no margin)."
    )
    reward_thumbs_weight: float = setting(1.0, "Weight of the thumbs loss against the pairwise loss.")
    reward_ratings_weight: float = setting(1.0, "Weight of the ordinal ratings loss against the pairwise loss.")
    reward_center_coefficient: float = setting(0.01, "Penalty on the squared mean reward (0 turns centering off).")
    # Each floor is checked against the figure's one-sided 95% upper bound on the held-out evidence,
    # as in the policy's gate: only a figure below it beyond sampling noise fails.
    reward_min_accuracy: float = setting(0.6, "Gate: held-out pairwise accuracy must reach this.")
    reward_min_thumbs_auc: float = setting(0.6, "Gate: held-out thumbs AUC (up above down) must reach this.")
    reward_min_rating_spearman: float = setting(
        0.1, "Gate: rank correlation of reward with held-out ratings must reach this."
    )
    reward_max_length_correlation: float = setting(
        0.5, "Gate: warn when |correlation of reward with completion length| exceeds this (a reward hack)."
    )

    def __post_init__(self) -> None:
        _check(self.reward_learning_rate > 0 and self.reward_anchor_learning_rate > 0, "learning rates must be > 0")
        _check(self.reward_epochs >= 1 and self.reward_batch_size >= 1, "reward_epochs and reward_batch_size >= 1")
        _check(
            self.reward_max_prompt_tokens >= 1 and self.reward_max_completion_tokens >= 1, "token limits must be >= 1"
        )
        _check(self.reward_lora_r >= 1 and self.reward_lora_alpha >= 1, "reward LoRA rank and alpha must be >= 1")
        _check(bool(self.reward_lora_targets), "reward_lora_targets must name at least one module")
        _check(self.reward_rating_margin >= 0, "reward_rating_margin must be >= 0")
        _check(self.reward_thumbs_weight >= 0 and self.reward_ratings_weight >= 0, "reward loss weights must be >= 0")
        _check(self.reward_center_coefficient >= 0, "reward_center_coefficient must be >= 0")
        _check(0.0 <= self.reward_min_accuracy <= 1.0, "reward_min_accuracy must be in [0, 1]")
        _check(0.0 <= self.reward_min_thumbs_auc <= 1.0, "reward_min_thumbs_auc must be in [0, 1]")
        _check(-1.0 <= self.reward_min_rating_spearman <= 1.0, "reward_min_rating_spearman must be in [-1, 1]")
        _check(0.0 < self.reward_max_length_correlation <= 1.0, "reward_max_length_correlation must be in (0, 1]")

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PPOConfig:
    """PPO on the LoRA policy against the current reward model (`--algo ppo`)."""

    ppo_iterations: int = setting(24, "PPO iterations (rollouts then updates); the first limit reached ends the loop.")
    ppo_max_minutes: float = setting(20.0, "Wall-clock budget of the PPO loop, in minutes.")
    ppo_kl_ceiling: float = setting(
        0.3, "Stop once the rollouts' mean KL to the reference exceeds this, in nats per token."
    )
    ppo_prompts_per_iteration: int = setting(16, "Prompts users sent (the completion log) rolled out per iteration.")
    ppo_samples_per_prompt: int = setting(2, "Completions sampled per prompt and iteration.")
    ppo_max_new_tokens: int = setting(48, "New tokens per rollout (a reply cut here counts as not ended).")
    ppo_temperature: float = setting(1.0, "Rollout temperature (plain sampling: no top-k or top-p, which bias the KL).")
    ppo_epochs: int = setting(2, "PPO epochs over each iteration's rollouts.")
    ppo_minibatch_size: int = setting(8, "Rollouts per PPO minibatch.")
    ppo_learning_rate: float = setting(2e-4, "AdamW learning rate of the policy's LoRA.")
    ppo_value_learning_rate: float = setting(2e-4, "AdamW learning rate of the critic (value head and its LoRA).")
    ppo_clip: float = setting(0.2, "Policy ratio clip epsilon.")
    ppo_value_clip: float = setting(0.2, "Value clip epsilon.")
    ppo_gamma: float = setting(1.0, "Discount.")
    ppo_lam: float = setting(0.95, "GAE lambda.")
    ppo_kl_coef: float = setting(0.05, "KL penalty coefficient beta (the start value when ppo_target_kl is set).")
    ppo_target_kl: float = setting(0.0, "Adapt beta so each rollout's KL (nats per reply) tracks this; 0: fixed beta.")
    ppo_score_clip: float = setting(5.0, "The normalised reward-model score is clipped to +-this.")
    ppo_missing_eos_penalty: float = setting(1.0, "Subtracted from the score of a reply cut at ppo_max_new_tokens.")
    ppo_reference: str = setting(
        "base", "'base' (adapter disabled) or 'served' (a frozen copy of the served adapter; rounds chain)."
    )
    # The policy's own LoRA shape (a chained round takes the served adapter's shape instead).
    ppo_lora_r: int = setting(8, "Policy LoRA rank.")
    ppo_lora_alpha: int = setting(16, "Policy LoRA alpha (scale = alpha / r).")
    ppo_lora_targets: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "Policy LoRA modules.")
    ppo_max_prompt_tokens: int = setting(256, "Prompts are cut to their last this-many tokens.")
    ppo_seed: int = setting(0, "Seed for LoRA init, prompt choice and sampling.")

    def __post_init__(self) -> None:
        _check(self.ppo_iterations >= 1, f"ppo_iterations must be >= 1, got {self.ppo_iterations}")
        _check(self.ppo_max_minutes > 0, "ppo_max_minutes must be > 0")
        _check(self.ppo_kl_ceiling > 0, "ppo_kl_ceiling must be > 0")
        _check(self.ppo_prompts_per_iteration >= 1 and self.ppo_samples_per_prompt >= 1, "rollout counts must be >= 1")
        _check(self.ppo_max_new_tokens >= 2, "ppo_max_new_tokens must be >= 2")
        _check(self.ppo_temperature > 0, "ppo_temperature must be > 0")
        _check(self.ppo_epochs >= 1 and self.ppo_minibatch_size >= 1, "ppo_epochs and ppo_minibatch_size must be >= 1")
        _check(self.ppo_learning_rate > 0 and self.ppo_value_learning_rate > 0, "learning rates must be > 0")
        _check(self.ppo_clip > 0 and self.ppo_value_clip > 0, "clip epsilons must be > 0")
        _check(0.0 <= self.ppo_gamma <= 1.0 and 0.0 <= self.ppo_lam <= 1.0, "ppo_gamma and ppo_lam must be in [0, 1]")
        _check(self.ppo_kl_coef >= 0 and self.ppo_target_kl >= 0, "ppo_kl_coef and ppo_target_kl must be >= 0")
        _check(self.ppo_score_clip > 0, "ppo_score_clip must be > 0")
        _check(self.ppo_missing_eos_penalty >= 0, "ppo_missing_eos_penalty must be >= 0")
        _check(self.ppo_reference in REFERENCES, f"ppo_reference must be one of {REFERENCES}")
        _check(self.ppo_max_prompt_tokens >= 1, "ppo_max_prompt_tokens must be >= 1")
        _check(self.ppo_lora_r >= 1 and self.ppo_lora_alpha >= 1, "ppo_lora_r and ppo_lora_alpha must be >= 1")
        _check(bool(self.ppo_lora_targets), "ppo_lora_targets must name at least one module")

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ComputeConfig:
    """Where and how every algorithm runs the model (not part of what a round means: a version
    trained on a GPU in bf16 is the same round as one trained on a CPU in fp32)."""

    dtype: str = setting("auto", "'auto' (bf16 where the device has native bf16 math), 'float32' or 'bfloat16'.")
    device: str = setting("auto", "'auto' (cuda if available), 'cpu' or 'cuda'.")
    threads: int = setting(0, "CPU threads for torch (0 leaves torch's default).")
    attn_implementation: str = setting(
        "sdpa", "Attention kernel: 'sdpa' (memory-efficient) or 'eager' (~10% faster on a CPU at a few hundred tokens)."
    )
    # The longest wait is the other ranks' while rank 0 reads the store before training and runs
    # the gate after it; torch's own default is 30 minutes too.
    collective_timeout_minutes: float = setting(
        30.0,
        "torchrun launches: how long a rank waits for the others, to join and at each collective, before the "
        "round fails (cover rank 0's store read and gate, during which the other ranks wait).",
    )

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        _check(
            self.attn_implementation in ATTENTION,
            f"attn_implementation must be one of {ATTENTION}, got {self.attn_implementation!r}",
        )
        _check(
            self.collective_timeout_minutes > 0,
            f"collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}",
        )


@dataclass
class GateConfig:
    """When a candidate adapter may be published to the `current` channel."""

    # User choices are noisy labels: many pairs differ in little the model can learn, so even a
    # candidate that clearly moved the served behaviour ranks held-out pairs near chance (0.52 for
    # the bench/closed_loop.py adapter that raised held-out sentiment by +0.61). The default therefore
    # only rejects candidates that rank held-out pairs worse than a coin flip; KL and diversity
    # bound how far they may go.
    min_accuracy: float = setting(
        0.5,
        "Held-out preference accuracy (implicit reward margin > 0) must not be below this with 95% confidence "
        "(the Wilson upper bound over the held-out pairs); raise it for clean labels.",
    )
    beat_served: bool = setting(
        True, "Also require beating the adapter now served on the same held-out pairs (accuracy, then margin)."
    )
    # A DPO round that moved held-out sentiment by +0.6 measured 0.30 and 0.49 nats per token on
    # the gate's samples (bench/closed_loop.py runs on 467 and 511 pairs), so the bound leaves room for
    # real learning and stops drift well beyond it; the diversity check catches collapse.
    # Measured (README, "Gate"): the sentiment closed loop's good adapter drifted 0.32 nats/token, a
    # degenerate surface-property adapter 0.57, another 0.24 (caught by the NLL check). KL is a drift
    # budget, not a quality signal: 0.5 leaves the good adapter 1.5x headroom.
    max_kl_per_token: float = setting(
        0.5,
        "Bound on the estimated KL(candidate || reference) in nats per sampled token: how far the candidate may "
        "move from its reference (0.5: each sampled token e^0.5 = 1.6x likelier than under the reference, on "
        "average).",
    )
    # A reward model's score is on its own scale (the reward_scale in its manifest), so the
    # default asks only that the candidate's held-out samples score above the reference's.
    min_reward_gain: float = setting(
        0.0,
        "Reward-model algorithms (PPO): the reward model's mean score of the candidate's held-out samples minus "
        "the reference's must exceed this.",
    )
    # The implicit rewards of desirable and undesirable replies to different prompts overlap a lot
    # (user labels are noisy, as for DPO's accuracy): like min_accuracy, the default only turns
    # down a candidate that ranks them backwards beyond sampling noise.
    min_reward_auc: float = setting(
        0.5,
        "KTO: the held-out AUC of the implicit reward (desirable above undesirable) must not be below this with "
        "95% confidence (a Wilson upper bound over the smaller class).",
    )
    min_diversity_ratio: float = setting(
        0.8, "Candidate distinct-1 and distinct-2 must stay above this fraction of the reference's."
    )
    # Fluency: a candidate that learned an oracle's surface property (emoji and exclamation marks,
    # 327 + 83 pairs) wrote replies the base model scored at 3.15 nats/token against 2.23 for its
    # own samples on the same prompts (+0.92, 2.5x the perplexity) while its KL was only 0.57 nats
    # per token; the sentiment loop's goal is an increase of at most 0.3. 0.5 lies between.
    max_nll_increase_per_token: float = setting(
        0.5,
        "Bound on the reference model's NLL per token of the candidate's samples minus that of its own samples on "
        "the same prompts, in nats (0.5: 1.65x the perplexity).",
    )
    # Degeneration signals, each the candidate's share minus the reference's on the same prompts;
    # cheap, and readable in the report where an NLL figure is not.
    max_repetition_increase: float = setting(
        0.2, "Bound on the rise in the share of 3-grams that repeat earlier in the same reply."
    )
    max_non_language_increase: float = setting(
        0.1, "Bound on the rise in the share of characters that are symbols (emoji...) or control characters."
    )
    max_empty_increase: float = setting(0.1, "Bound on the rise in the share of empty replies.")
    max_cutoff_increase: float = setting(
        0.3, "Bound on the rise in the share of replies cut off at sample_max_tokens without EOS."
    )
    eval_prompts: int = setting(16, "Held-out prompts sampled for the KL and diversity checks.")
    samples_per_prompt: int = setting(2, "Samples per held-out prompt, from candidate and reference each.")
    sample_max_tokens: int = setting(32, "New tokens per sample.")
    sample_temperature: float = setting(1.0, "Sampling temperature (1.0 keeps the KL estimate unbiased).")

    def __post_init__(self) -> None:
        _check(0.0 <= self.min_accuracy <= 1.0, f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        _check(self.max_kl_per_token > 0, f"max_kl_per_token must be > 0, got {self.max_kl_per_token}")
        _check(math.isfinite(self.min_reward_gain), f"min_reward_gain must be finite, got {self.min_reward_gain}")
        _check(0.0 <= self.min_reward_auc <= 1.0, f"min_reward_auc must be in [0, 1], got {self.min_reward_auc}")
        _check(0.0 <= self.min_diversity_ratio <= 1.0, "min_diversity_ratio must be in [0, 1]")
        _check(self.max_nll_increase_per_token > 0, "max_nll_increase_per_token must be > 0")
        for name in ("repetition", "non_language", "empty", "cutoff"):
            bound = getattr(self, f"max_{name}_increase")
            _check(0.0 <= bound <= 1.0, f"max_{name}_increase must be in [0, 1] (a difference of shares), got {bound}")
        _check(self.eval_prompts >= 1 and self.samples_per_prompt >= 1, "eval_prompts and samples_per_prompt >= 1")
        _check(self.sample_max_tokens >= 2, "sample_max_tokens must be >= 2 (distinct-2 needs two tokens)")
        _check(self.sample_temperature > 0, f"sample_temperature must be > 0, got {self.sample_temperature}")


@dataclass
class SidecarConfig:
    """When `tuneloop trainer run` starts a round."""

    min_new_pairs: int = setting(
        64,
        "Start a round as soon as this many new usable pairs arrived (N); for --algo reward and ppo, "
        "each new thumb and rating counts as one too; for kto, only its labelled thumbs and ratings count.",
    )
    interval_minutes: float = setting(60.0, "Or every this many minutes (T)...")
    min_new_pairs_periodic: int = setting(16, "...if at least this many new usable pairs arrived (M).")
    poll_seconds: float = setting(30.0, "How often the feedback store is checked.")
    metrics_port: int = setting(9401, "Prometheus metrics port (0 disables the endpoint).")
    # Loopback like the server's endpoints: exposing it is a choice, warned about at start.
    metrics_host: str = setting("127.0.0.1", "Address the metrics endpoint binds (0.0.0.0 exposes it).")

    def __post_init__(self) -> None:
        _check(self.min_new_pairs >= 1, f"min_new_pairs must be >= 1, got {self.min_new_pairs}")
        _check(self.interval_minutes > 0, f"interval_minutes must be > 0, got {self.interval_minutes}")
        _check(
            1 <= self.min_new_pairs_periodic <= self.min_new_pairs,
            "min_new_pairs_periodic must be between 1 and min_new_pairs",
        )
        _check(self.poll_seconds > 0, f"poll_seconds must be > 0, got {self.poll_seconds}")
        _check(0 <= self.metrics_port <= 65535, f"metrics_port must be a TCP port, got {self.metrics_port}")


AUTO = "auto"
ALGOS = ("dpo", "kto", "reward", "ppo", AUTO)
PUBLISH_MODES = ("canary", "current")


@dataclass
class TrainerConfig:
    """One trainer: where data comes from, which base model, where adapters go, and each stage."""

    adapter: str = setting("default", "Adapter name in the registry that this trainer publishes.")
    algo: str = setting(
        "dpo",
        "Training algorithm: 'dpo' (a policy from preference pairs), 'kto' (a policy from unpaired thumbs and "
        "ratings), 'reward' (a reward model alone), 'ppo' (a reward model, then PPO against it) or 'auto' "
        "(dpo, kto or ppo, picked each round from the feedback at hand).",
    )
    model_dir: str = setting("", "Base model: a local Hugging Face directory (default: the built-in SmolLM2).")
    registry_dir: str = setting(
        "",
        "Adapter registry directory (default $TUNELOOP_HOME/adapters); with registry_url, where this host keeps "
        "the versions it fetched from there.",
    )
    registry_url: str = setting(
        "",
        "Shared adapter registry on an object store, e.g. s3://BUCKET/PREFIX: the server's registry_url (default: "
        "$TUNELOOP_REGISTRY_URL, the variable the server reads; empty: the directory registry_dir). Endpoint and "
        "credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_DEFAULT_REGION).",
    )
    store_url: str = setting(
        "", "Feedback store URL (default: $TUNELOOP_STORE_URL, the variable the server reads, else its default store)."
    )
    work_dir: str = setting("", "Scratch directory for candidate adapters (default: a temp dir).")
    # For --algo reward and ppo a thumb or a rating counts as one example beside the pairs; kto
    # counts its labelled thumbs and ratings alone.
    min_train_pairs: int = setting(
        8,
        "Fewer usable training pairs than this (reward/ppo: pairs, thumbs and ratings; kto: labelled thumbs and "
        "ratings): the round is skipped.",
    )
    min_heldout_pairs: int = setting(
        2,
        "Fewer held-out pairs than this (reward/ppo: pairs, thumbs and ratings; kto: labelled thumbs and "
        "ratings): the round is skipped.",
    )
    progress: bool = setting(True, "Show a progress bar (steps, loss) on the terminal.")
    publish: str = setting(
        "canary",
        "Where an accepted version goes: 'canary' (a share of default traffic until live feedback promotes "
        "it to current or rolls it back) or 'current' (all default traffic at once).",
    )
    canary_share: float = setting(0.1, "Share of default traffic (sticky per user) a new canary takes.")
    data: DatasetConfig = field(default_factory=DatasetConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)

    def __post_init__(self) -> None:
        from tuneloop.server.registry import validate_name  # noqa: PLC0415 - keeps import order simple

        validate_name(self.adapter)
        _check(self.algo in ALGOS, f"algo must be one of {ALGOS}, got {self.algo!r}")
        _check(self.publish in PUBLISH_MODES, f"publish must be one of {PUBLISH_MODES}, got {self.publish!r}")
        _check(0.0 < self.canary_share <= 1.0, f"canary_share must be in (0, 1], got {self.canary_share}")
        _check(self.min_train_pairs >= 1, f"min_train_pairs must be >= 1, got {self.min_train_pairs}")
        _check(self.min_heldout_pairs >= 1, f"min_heldout_pairs must be >= 1, got {self.min_heldout_pairs}")
        # KTO's reference point comes from mismatched pairs within a step's batch: one example has none.
        _check(
            self.algo not in ("kto", AUTO) or self.dpo.batch_size >= 2,
            f"--algo {self.algo} needs batch_size >= 2 (KTO estimates its reference point within a batch)",
        )
        if self.model_dir:
            _check(
                (Path(self.model_dir) / "config.json").is_file(),
                f"model_dir {self.model_dir} is not a Hugging Face model directory (no config.json)",
            )

    def resolved_model_dir(self) -> Path:
        if self.model_dir:
            return Path(self.model_dir)
        from tuneloop.server.model_cache import ensure_default_model  # noqa: PLC0415

        return ensure_default_model()

    def resolved_store_url(self) -> str:
        """The server's store when none is set, so a sidecar beside it needs no flags: the
        server's environment variable (which keeps a database password out of the command line,
        where `ps` shows it), else its default."""
        if self.store_url:
            return self.store_url
        if os.environ.get("TUNELOOP_STORE_URL"):
            return os.environ["TUNELOOP_STORE_URL"]
        from tuneloop.server.config import tuneloop_home  # noqa: PLC0415

        return f"sqlite:///{(tuneloop_home() / 'tuneloop.db').resolve()}"

    def open_registry(self) -> Registry:
        """The server's registry when none is set, as with the store: `registry_url`, else
        $TUNELOOP_REGISTRY_URL, else the directory. Raises RegistryUnavailable naming the setting."""
        from tuneloop.server.registry import open_registry  # noqa: PLC0415 - keeps import order simple

        return open_registry(self.registry_url or os.environ.get("TUNELOOP_REGISTRY_URL", ""), self.registry_dir)


SECTIONS = ("data", "dpo", "kto", "reward", "ppo", "compute", "gate", "sidecar", "auto")


def leaf_fields(cls: type) -> list[Any]:
    """The non-section fields of a config dataclass."""
    return [f for f in fields(cls) if f.name not in SECTIONS]
