"""The evaluation gate: is a candidate adapter better, and still close to and as diverse as its
reference?

Held-out pairs give preference accuracy (how often the implicit reward
beta * log(pi / pi_base) ranks the chosen completion above the rejected one) and the mean
margin; the adapter now served is scored the same way on the same pairs. Samples on held-out
prompts give a KL estimate to the reference and distinct-1/2 against the reference's samples.
Fluency and sanity checks apply to every algorithm: the reference's per-token NLL of the
candidate's samples against that of its own samples on the same prompts (a candidate that learned
to please a surface-level oracle writes text its reference finds unlikely), and cheap degeneration
signals (repeated n-grams, non-language characters, empty replies, replies cut off without EOS),
each compared with the reference's samples. The metric functions are pure; `evaluate_candidate`
runs the model to feed them.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import GateConfig
from .dpo import TokenizedPair, score_pairs
from .model import SERVED, TRAINED, adapter_mode, autocast, score_sequences


# -- pure metrics -------------------------------------------------------------------------------
def implicit_margins(
    chosen: torch.Tensor, rejected: torch.Tensor, base_chosen: torch.Tensor, base_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """(M,) beta * [(log pi_w - log base_w) - (log pi_l - log base_l)] from (M,) log-probs."""
    return beta * ((chosen - base_chosen) - (rejected - base_rejected))


def preference_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs with margin > 0; (M,) -> float (0 when M == 0). A tie counts as wrong."""
    return float((margins > 0).float().mean()) if margins.numel() else 0.0


def kl_estimate(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> float:
    """Monte-Carlo KL(policy || reference) in nats per sequence.

    Args:
        policy_logps:    (S,) log pi(y_s | x_s) of S samples drawn from the policy.
        reference_logps: (S,) log pi_ref(y_s | x_s) of the same samples.

    The mean of log pi - log pi_ref over policy samples is unbiased for the KL, though a single
    sample can be negative.
    """
    return float((policy_logps - reference_logps).mean()) if policy_logps.numel() else 0.0


def kl_per_token(policy_logps: torch.Tensor, reference_logps: torch.Tensor, lengths: Sequence[int]) -> float:
    """The same KL estimate in nats per sampled token: sum(log pi - log pi_ref) / sum(lengths).

    A bound per token does not change meaning with the sample length (or with how early a
    candidate learned to stop), as a bound per completion would.
    """
    total = sum(lengths)
    return float((policy_logps - reference_logps).sum()) / total if total else 0.0


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled across sequences (Li et al. 2016); 0 if none."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def nll_per_token(logps: torch.Tensor, lengths: Sequence[int]) -> float:
    """Mean negative log-likelihood per token, -sum_s log p(y_s | x_s) / sum_s |y_s|, in nats.

    Args:
        logps:   (S,) summed log-probs of S completions under the scoring model.
        lengths: S completion lengths in tokens.
    exp of it is the perplexity; 0 when there are no tokens.
    """
    total = sum(lengths)
    return -float(logps.sum()) / total if total else 0.0


def repetition_share(sequences: Sequence[Sequence[Hashable]], n: int = 3) -> float:
    """Share of n-grams that already occurred earlier in the same sequence, pooled; 0 if none.

    Unlike distinct-n (pooled across sequences), this sees a reply that loops on itself even when
    every reply loops on something different.
    """
    repeats = total = 0
    for s in sequences:
        seen: set[tuple[Hashable, ...]] = set()
        for i in range(len(s) - n + 1):
            gram = tuple(s[i : i + n])
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / total if total else 0.0


def non_language_share(texts: Sequence[str]) -> float:
    """Share of non-space characters that are neither letters, digits nor punctuation, pooled.

    Unicode categories decide: emoji and other symbols (S*), control, format and unassigned
    characters (C*) count as non-language; marks (M*) go with the letters they modify.
    """
    chars = [ch for t in texts for ch in t if not ch.isspace()]
    bad = sum(1 for ch in chars if unicodedata.category(ch)[0] in "SC")
    return bad / len(chars) if chars else 0.0


def empty_share(texts: Sequence[str]) -> float:
    """Share of replies with no visible character; 0 when there are none."""
    return sum(1 for t in texts if not t.strip()) / len(texts) if texts else 0.0


def cutoff_share(completions: Sequence[Sequence[int]], eos_id: int) -> float:
    """Share of sampled completions that hit the token limit without ending in EOS."""
    return sum(1 for c in completions if not c or c[-1] != eos_id) / len(completions) if completions else 0.0


@dataclass(frozen=True)
class Sanity:
    """The degeneration signals of one policy's samples."""

    repetition: float
    non_language: float
    empty: float
    cutoff: float


def sanity(completions: Sequence[Sequence[int]], texts: Sequence[str], eos_id: int) -> Sanity:
    return Sanity(
        repetition=repetition_share(completions),
        non_language=non_language_share(texts),
        empty=empty_share(texts),
        cutoff=cutoff_share(completions, eos_id),
    )


@dataclass
class GateMetrics:
    """The gate's figures. The held-out pair figures (accuracy, margin) belong to algorithms that
    train on pairs (DPO); `reward_gain` to those that optimise a reward model (PPO); the rest,
    from samples on held-out prompts, to every algorithm."""

    heldout_pairs: int
    accuracy: float | None
    margin: float | None
    served_accuracy: float | None
    served_margin: float | None
    kl: float
    kl_per_token: float
    distinct_1: float
    distinct_2: float
    reference_distinct_1: float
    reference_distinct_2: float
    samples: int
    # The reference model's NLL per token of the candidate's samples and of its own samples.
    nll_per_token: float = 0.0
    reference_nll_per_token: float = 0.0
    repetition: float = 0.0
    reference_repetition: float = 0.0
    non_language: float = 0.0
    reference_non_language: float = 0.0
    empty: float = 0.0
    reference_empty: float = 0.0
    cutoff: float = 0.0
    reference_cutoff: float = 0.0
    # The reward model's mean score of the candidate's samples minus the reference's samples'.
    reward_gain: float | None = None
    # KTO: held-out desirable and undesirable examples (None for other algorithms), the AUC of the
    # implicit reward between them (None without both classes), and the mean reward gap
    # (desirable minus undesirable); the served adapter's on the same examples, if one is loaded.
    heldout_desirable: int | None = None
    heldout_undesirable: int | None = None
    reward_auc: float | None = None
    reward_gap: float | None = None
    served_reward_auc: float | None = None
    served_reward_gap: float | None = None

    @property
    def nll_increase_per_token(self) -> float:
        return self.nll_per_token - self.reference_nll_per_token

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nll_increase_per_token"] = self.nll_increase_per_token
        return d


@dataclass
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)  # one line per failed check: what and by how much
    failed_checks: list[str] = field(default_factory=list)  # their names, same order (metrics label)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), "failed_checks": list(self.failed_checks)}


GATE_CHECKS = (
    "accuracy", "reward_auc", "beat_served", "reward_gain", "kl", "distinct_1", "distinct_2", "nll", "repetition",
    "non_language", "empty", "cutoff",
)  # fmt: skip


def wilson_upper(share: float, n: int, z: float = 1.645) -> float:
    """One-sided upper confidence bound (95% for z = 1.645) of a binomial share seen in n trials
    (Wilson 1927); 1 with no trials."""
    if n <= 0:
        return 1.0
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def auc_upper(auc: float, n_positive: int, n_negative: int) -> float:
    """One-sided 95% upper confidence bound of an AUC measured on n_positive x n_negative examples.

    The variance of an AUC estimate is at most AUC * (1 - AUC) / min(n_positive, n_negative)
    (Birnbaum and Klose 1957), the variance of a share seen in min(n_positive, n_negative)
    trials: the Wilson bound over the smaller class is therefore a conservative bound for the AUC.
    """
    return wilson_upper(auc, min(n_positive, n_negative))


def decide(m: GateMetrics, cfg: GateConfig) -> GateResult:
    """Every check is run so the manifest says all the reasons a candidate failed, not just the first."""
    failed: list[tuple[str, str]] = []
    # User choices are noisy labels: on 69 held-out pairs a candidate that raised the preference
    # by +0.57 scored 0.493. Only accuracy that is below the bound beyond sampling noise fails.
    if m.accuracy is not None and not wilson_upper(m.accuracy, m.heldout_pairs) >= cfg.min_accuracy:
        failed.append((
            "accuracy",
            f"held-out accuracy {m.accuracy:.3f} over {m.heldout_pairs} pairs (95% upper bound "
            f"{wilson_upper(m.accuracy, m.heldout_pairs):.3f}) < min_accuracy {cfg.min_accuracy:.3f}",
        ))
    if m.heldout_desirable is not None and m.heldout_undesirable is not None:  # KTO's held-out check
        n_d, n_u = m.heldout_desirable, m.heldout_undesirable
        if m.reward_auc is None:
            failed.append((
                "reward_auc",
                f"no held-out desirable and undesirable examples to compare ({n_d} desirable, {n_u} undesirable)",
            ))
        elif not auc_upper(m.reward_auc, n_d, n_u) >= cfg.min_reward_auc:
            failed.append((
                "reward_auc",
                f"held-out implicit-reward AUC {m.reward_auc:.3f} over {n_d} desirable and {n_u} undesirable "
                f"examples (95% upper bound {auc_upper(m.reward_auc, n_d, n_u):.3f}) < min_reward_auc "
                f"{cfg.min_reward_auc:.3f}",
            ))
        if cfg.beat_served and m.served_reward_auc is not None and m.reward_auc is not None:
            served_gap = m.served_reward_gap if m.served_reward_gap is not None else -math.inf
            if (m.reward_auc, m.reward_gap or 0.0) <= (m.served_reward_auc, served_gap):
                failed.append((
                    "beat_served",
                    f"does not beat the served adapter: reward AUC {m.reward_auc:.3f} (gap {m.reward_gap or 0.0:.3f}) "
                    f"vs {m.served_reward_auc:.3f} (gap {served_gap:.3f})",
                ))
    if cfg.beat_served and m.served_accuracy is not None and m.accuracy is not None:
        served_margin = m.served_margin if m.served_margin is not None else -math.inf
        if (m.accuracy, m.margin or 0.0) <= (m.served_accuracy, served_margin):
            failed.append((
                "beat_served",
                f"does not beat the served adapter: accuracy {m.accuracy:.3f} (margin {m.margin or 0.0:.3f}) vs "
                f"{m.served_accuracy:.3f} (margin {served_margin:.3f})",
            ))
    if m.reward_gain is not None and not m.reward_gain > cfg.min_reward_gain:
        failed.append((
            "reward_gain",
            f"the reward model scores the candidate's held-out samples {m.reward_gain:+.3f} against the "
            f"reference's (must be > min_reward_gain {cfg.min_reward_gain:+.3f})",
        ))
    if not m.kl_per_token <= cfg.max_kl_per_token:  # also fails on NaN
        failed.append((
            "kl",
            f"KL to reference {m.kl_per_token:.3f} nats/token ({m.kl:.2f} per completion) > "
            f"max_kl_per_token {cfg.max_kl_per_token:.3f}",
        ))
    for n, cand, ref in ((1, m.distinct_1, m.reference_distinct_1), (2, m.distinct_2, m.reference_distinct_2)):
        if cand < cfg.min_diversity_ratio * ref:
            why = f"distinct-{n} {cand:.3f} < {cfg.min_diversity_ratio:.2f} x reference's {ref:.3f}"
            failed.append((f"distinct_{n}", why))
    rise = m.nll_increase_per_token
    if not rise <= cfg.max_nll_increase_per_token:
        failed.append((
            "nll",
            f"reference NLL of the candidate's samples {m.nll_per_token:.3f} nats/token vs "
            f"{m.reference_nll_per_token:.3f} of its own: +{rise:.3f} > "
            f"max_nll_increase_per_token {cfg.max_nll_increase_per_token:.3f}",
        ))
    for name, cand, ref, bound in (
        ("repetition", m.repetition, m.reference_repetition, cfg.max_repetition_increase),
        ("non_language", m.non_language, m.reference_non_language, cfg.max_non_language_increase),
        ("empty", m.empty, m.reference_empty, cfg.max_empty_increase),
        ("cutoff", m.cutoff, m.reference_cutoff, cfg.max_cutoff_increase),
    ):
        if not cand - ref <= bound:
            failed.append((
                name,
                f"{name} share {cand:.3f} vs reference's {ref:.3f}: +{cand - ref:.3f} > "
                f"max_{name}_increase {bound:.3f}",
            ))
    return GateResult(passed=not failed, failures=[f for _, f in failed], failed_checks=[c for c, _ in failed])


# -- running the model --------------------------------------------------------------------------
@torch.no_grad()
def sample_completions(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    mode: str,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """n samples per prompt as (prompt_ids, completion_ids), the completion cut after its first EOS.

    Pure ancestral sampling (top_k 0, top_p 1): the KL estimate needs samples from the policy
    itself, not from a truncated version of it.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: generation continues from the last column
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    torch.manual_seed(seed)
    model.eval()
    with adapter_mode(model, mode), autocast(device, dtype):
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=pad,
            eos_token_id=eos,
        )
    results = []
    for row, seq in enumerate(out[:, width:].tolist()):
        end = seq.index(eos) + 1 if eos in seq else len(seq)
        results.append((tuple(prompts[row // n]), tuple(seq[:end])))
    return results


def decode_replies(tokenizer: PreTrainedTokenizerBase, completions: Sequence[Sequence[int]]) -> list[str]:
    """The text of each completion, special tokens (EOS) left out: the character-level checks read it."""
    return [str(tokenizer.decode(list(c), skip_special_tokens=True)) for c in completions]  # one text per id list


@dataclass(frozen=True)
class HeldoutSamples:
    """The samples the shared checks were computed on, for an algorithm's own scorer."""

    candidate: list[tuple[tuple[int, ...], tuple[int, ...]]]
    reference: list[tuple[tuple[int, ...], tuple[int, ...]]]


def evaluate_samples(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    cfg: GateConfig,
    *,
    reference: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, Any], HeldoutSamples]:
    """The shared checks' figures (KL, diversity, fluency and sanity), from samples of the trained
    adapter and of `reference` ("base" or SERVED) on the first `cfg.eval_prompts` prompts: every
    algorithm's candidate is gated on these. Returns GateMetrics fields and the samples."""
    kw: dict[str, Any] = {"pad_id": tokenizer.pad_token_id, "device": device, "dtype": dtype}
    unique_prompts = list(dict.fromkeys(tuple(p) for p in prompts))[: cfg.eval_prompts]
    sample_kw: dict[str, Any] = dict(
        n=cfg.samples_per_prompt,
        max_new_tokens=cfg.sample_max_tokens,
        temperature=cfg.sample_temperature,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    cand_samples = sample_completions(model, tokenizer, unique_prompts, mode=TRAINED, **sample_kw)
    ref_samples = sample_completions(model, tokenizer, unique_prompts, mode=reference, **sample_kw)
    policy_lp = score_sequences(model, cand_samples, mode=TRAINED, **kw)
    ref_lp = score_sequences(model, cand_samples, mode=reference, **kw)
    ref_own_lp = score_sequences(model, ref_samples, mode=reference, **kw)
    cand_tokens = [c for _, c in cand_samples]
    ref_tokens = [c for _, c in ref_samples]
    eos = tokenizer.eos_token_id
    cand_sanity = sanity(cand_tokens, decode_replies(tokenizer, cand_tokens), eos)
    ref_sanity = sanity(ref_tokens, decode_replies(tokenizer, ref_tokens), eos)
    fields = dict(
        kl=kl_estimate(policy_lp, ref_lp),
        kl_per_token=kl_per_token(policy_lp, ref_lp, [len(c) for c in cand_tokens]),
        distinct_1=distinct_n(cand_tokens, 1),
        distinct_2=distinct_n(cand_tokens, 2),
        reference_distinct_1=distinct_n(ref_tokens, 1),
        reference_distinct_2=distinct_n(ref_tokens, 2),
        samples=len(cand_samples),
        nll_per_token=nll_per_token(ref_lp, [len(c) for c in cand_tokens]),
        reference_nll_per_token=nll_per_token(ref_own_lp, [len(c) for c in ref_tokens]),
        repetition=cand_sanity.repetition,
        reference_repetition=ref_sanity.repetition,
        non_language=cand_sanity.non_language,
        reference_non_language=ref_sanity.non_language,
        empty=cand_sanity.empty,
        reference_empty=ref_sanity.empty,
        cutoff=cand_sanity.cutoff,
        reference_cutoff=ref_sanity.cutoff,
    )
    return fields, HeldoutSamples(cand_samples, ref_samples)


def evaluate_candidate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Sequence[TokenizedPair],
    cfg: GateConfig,
    *,
    beta: float,
    reference: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> GateMetrics:
    """DPO's gate figures: the implicit-reward accuracy on held-out pairs (and the served
    adapter's, if loaded), plus the shared sample checks.

    `reference` is the adapter mode the candidate was trained against ("base" or SERVED): the KL
    and the diversity baseline are taken against it.
    """
    kw: dict[str, Any] = {"pad_id": tokenizer.pad_token_id, "device": device, "dtype": dtype}
    base_c, base_r = score_pairs(model, heldout, mode="base", **kw)
    cand_c, cand_r = score_pairs(model, heldout, mode=TRAINED, **kw)
    margins = implicit_margins(cand_c, cand_r, base_c, base_r, beta)
    served_acc = served_margin = None
    if SERVED in model.peft_config:
        srv_c, srv_r = score_pairs(model, heldout, mode=SERVED, **kw)
        served = implicit_margins(srv_c, srv_r, base_c, base_r, beta)
        served_acc, served_margin = preference_accuracy(served), float(served.mean())
    fields, _ = evaluate_samples(
        model, tokenizer, [it.prompt_ids for it in heldout], cfg, reference=reference, seed=seed, device=device,
        dtype=dtype,
    )  # fmt: skip
    return GateMetrics(
        heldout_pairs=len(heldout),
        accuracy=preference_accuracy(margins),
        margin=float(margins.mean()) if margins.numel() else 0.0,
        served_accuracy=served_acc,
        served_margin=served_margin,
        **fields,
    )
