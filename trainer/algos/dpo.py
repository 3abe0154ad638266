"""DPO as a round algorithm: a LoRA adapter trained on preference pairs against a frozen
reference (the base model, or the served adapter when rounds chain), gated on held-out pairs.

In a torchrun launch rank 0 runs `train` and sends the other ranks a `DPOShare`: they build the
same policy and train their shares of every global batch beside it; the gate is rank 0's alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.server.registry import AdapterVersion

from ..config import TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset
from ..distributed import DataParallel
from ..dpo import StepLog, TokenizedPair, TrainResult, score_pairs, tokenize_pair, train_dpo
from ..gate import evaluate_candidate
from ..model import trainable_parameters
from ..rows import PreferencePair
from .base import Candidate, Policy, RoundInputs, gate_verdict, load_policy, round_policy, training_figures


class DPO:
    name = "dpo"
    uses_pointwise = False
    data_parallel = True

    def target_name(self, cfg: TrainerConfig) -> str:
        return cfg.adapter

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        return cfg.dpo.hyperparameters()

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        return pairs, None

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, dc, parallel = inputs.cfg, inputs.cfg.dpo, inputs.parallel
        metrics = inputs.metrics

        def report(s: StepLog) -> None:
            metrics.last_loss.set(s.loss)

        if parallel is None:
            policy = load_policy(inputs, dc)
            trained = fit(policy, inputs.dataset.train, cfg, progress=cfg.progress, on_step=report)
        else:
            share = DPOShare(cfg, list(inputs.dataset.train), inputs.model_dir, inputs.served)
            with parallel.lockstep():
                parallel.broadcast(share)
                policy = load_policy(inputs, dc)
                trained = fit(policy, share.train, cfg, parallel=parallel, progress=cfg.progress, on_step=report)
        held_items = tokenize(policy, inputs.dataset.heldout, cfg)
        gate_metrics = evaluate_candidate(
            policy.model,
            policy.tokenizer,
            held_items,
            cfg.gate,
            beta=dc.beta,
            reference=policy.reference,
            seed=dc.seed,
            device=policy.device,
            dtype=policy.dtype,
        )
        if gate_metrics.accuracy is not None:
            metrics.heldout_accuracy.set(gate_metrics.accuracy)
        return Candidate(
            verdict=gate_verdict(gate_metrics, inputs),
            metrics={
                **gate_metrics.to_dict(),
                **training_figures(trained.steps, trained.seconds, [s.loss for s in trained.log]),
            },
            save=policy.save,
            manifest={**policy.manifest(), **({} if parallel is None else {"data_parallel": parallel.manifest()})},
        )


@dataclass(frozen=True)
class DPOShare:
    """What the other ranks of a data-parallel DPO round need from rank 0 (which alone reads the
    store and the registry) to build the same policy and train beside it."""

    cfg: TrainerConfig
    train: list[PreferencePair]
    model_dir: Path
    served: AdapterVersion | None  # its files are read from the same path on every rank

    def run(self, parallel: DataParallel) -> None:
        policy = round_policy(self.cfg, self.model_dir, self.served, self.cfg.dpo)
        fit(policy, self.train, self.cfg, parallel=parallel, progress=False)


def tokenize(policy: Policy, pairs: Sequence[PreferencePair], cfg: TrainerConfig) -> list[TokenizedPair]:
    dc = cfg.dpo
    return [tokenize_pair(policy.tokenizer, p, dc.max_prompt_tokens, dc.max_completion_tokens) for p in pairs]


def fit(
    policy: Policy,
    pairs: Sequence[PreferencePair],
    cfg: TrainerConfig,
    *,
    parallel: DataParallel | None = None,
    progress: bool,
    on_step: Callable[[StepLog], None] | None = None,
) -> TrainResult[StepLog]:
    """The reference log-probs (computed once), then the DPO loop; with `parallel`, every rank
    calls this with the same pairs and starts from rank 0's adapter."""
    dc = cfg.dpo
    items = tokenize(policy, pairs, cfg)
    kw: dict[str, Any] = {"pad_id": policy.pad_id, "device": policy.device, "dtype": policy.dtype}
    if parallel is not None:
        parallel.sync_parameters(trainable_parameters(policy.model))
    ref_c, ref_r = score_pairs(
        policy.model, items, mode=policy.reference, batch_size=dc.micro_batch_size, parallel=parallel, **kw
    )
    return train_dpo(policy.model, items, ref_c, ref_r, dc, progress=progress, on_step=on_step, parallel=parallel, **kw)
