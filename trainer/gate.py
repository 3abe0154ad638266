"""The evaluation gate: is a candidate adapter better, and still close to and as diverse as its
reference?

Held-out pairs give preference accuracy (how often the implicit reward
beta * log(pi / pi_base) ranks the chosen completion above the rejected one) and the mean
margin; the adapter now served is scored the same way on the same pairs. Samples on held-out
prompts give a KL estimate to the reference and distinct-1/2 against the reference's samples.
The metric functions are pure; `evaluate_candidate` runs the model to feed them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import GateConfig
from .dpo import TokenizedPair, collate_sequences, score_pairs
from .model import SERVED, TRAINED, adapter_mode, autocast, completion_logps


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


@dataclass
class GateMetrics:
    heldout_pairs: int
    accuracy: float
    margin: float
    served_accuracy: float | None
    served_margin: float | None
    kl: float
    kl_per_token: float
    distinct_1: float
    distinct_2: float
    reference_distinct_1: float
    reference_distinct_2: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures)}


def decide(m: GateMetrics, cfg: GateConfig) -> GateResult:
    """Every check is run so the manifest says all the reasons a candidate failed, not just the first."""
    failures = []
    if m.accuracy < cfg.min_accuracy:
        failures.append(f"held-out accuracy {m.accuracy:.3f} < min_accuracy {cfg.min_accuracy:.3f}")
    if cfg.beat_served and m.served_accuracy is not None:
        served_margin = m.served_margin if m.served_margin is not None else -math.inf
        if (m.accuracy, m.margin) <= (m.served_accuracy, served_margin):
            failures.append(
                f"does not beat the served adapter: accuracy {m.accuracy:.3f} (margin {m.margin:.3f}) vs "
                f"{m.served_accuracy:.3f} (margin {served_margin:.3f})"
            )
    if not m.kl_per_token <= cfg.max_kl_per_token:  # also fails on NaN
        failures.append(
            f"KL to reference {m.kl_per_token:.3f} nats/token ({m.kl:.2f} per completion) > "
            f"max_kl_per_token {cfg.max_kl_per_token:.3f}"
        )
    for n, cand, ref in ((1, m.distinct_1, m.reference_distinct_1), (2, m.distinct_2, m.reference_distinct_2)):
        if cand < cfg.min_diversity_ratio * ref:
            failures.append(f"distinct-{n} {cand:.3f} < {cfg.min_diversity_ratio:.2f} x reference's {ref:.3f}")
    return GateResult(passed=not failures, failures=failures)


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


@torch.no_grad()
def score_sequences(
    model: PeftModel,
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mode: str,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 16,
) -> torch.Tensor:
    """(S,) summed completion log-probs of (prompt, completion) sequences under one adapter mode."""
    out = []
    with adapter_mode(model, mode):
        for i in range(0, len(seqs), batch_size):
            ids, attn, comp = collate_sequences(seqs[i : i + batch_size], pad_id)
            out.append(completion_logps(model, ids.to(device), attn.to(device), comp.to(device), dtype=dtype).cpu())
    return torch.cat(out) if out else torch.zeros(0)


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
    """Score the trained adapter (and the served one, if loaded) on held-out data.

    `reference` is the adapter mode the candidate was trained against ("base" or SERVED): the KL
    and the diversity baseline are taken against it.
    """
    pad = tokenizer.pad_token_id
    kw: dict[str, Any] = {"pad_id": pad, "device": device, "dtype": dtype}
    base_c, base_r = score_pairs(model, heldout, mode="base", **kw)
    cand_c, cand_r = score_pairs(model, heldout, mode=TRAINED, **kw)
    margins = implicit_margins(cand_c, cand_r, base_c, base_r, beta)
    served_acc = served_margin = None
    if SERVED in model.peft_config:
        srv_c, srv_r = score_pairs(model, heldout, mode=SERVED, **kw)
        served = implicit_margins(srv_c, srv_r, base_c, base_r, beta)
        served_acc, served_margin = preference_accuracy(served), float(served.mean())

    unique_prompts = list(dict.fromkeys(it.prompt_ids for it in heldout))[: cfg.eval_prompts]
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
    cand_tokens = [c for _, c in cand_samples]
    ref_tokens = [c for _, c in ref_samples]
    return GateMetrics(
        heldout_pairs=len(heldout),
        accuracy=preference_accuracy(margins),
        margin=float(margins.mean()) if margins.numel() else 0.0,
        served_accuracy=served_acc,
        served_margin=served_margin,
        kl=kl_estimate(policy_lp, ref_lp),
        kl_per_token=kl_per_token(policy_lp, ref_lp, [len(c) for c in cand_tokens]),
        distinct_1=distinct_n(cand_tokens, 1),
        distinct_2=distinct_n(cand_tokens, 2),
        reference_distinct_1=distinct_n(ref_tokens, 1),
        reference_distinct_2=distinct_n(ref_tokens, 2),
        samples=len(cand_samples),
    )
