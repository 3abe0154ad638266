"""DPO as a round algorithm: a LoRA adapter trained on preference pairs against a frozen
reference (the base model, or the served adapter when rounds chain), gated on held-out pairs."""

from __future__ import annotations

from typing import Any

from ..config import TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset
from ..dpo import score_pairs, tokenize_pair, train_dpo
from ..gate import evaluate_candidate
from .base import Candidate, RoundInputs, gate_verdict, load_policy, training_figures


class DPO:
    name = "dpo"
    uses_pointwise = False

    def target_name(self, cfg: TrainerConfig) -> str:
        return cfg.adapter

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        return cfg.dpo.hyperparameters()

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        return pairs, None

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, dc = inputs.cfg, inputs.cfg.dpo
        policy = load_policy(inputs, dc)
        model, tokenizer, reference = policy.model, policy.tokenizer, policy.reference

        def tokenize(pairs: Any) -> list[Any]:
            return [tokenize_pair(tokenizer, p, dc.max_prompt_tokens, dc.max_completion_tokens) for p in pairs]

        train_items, held_items = tokenize(inputs.dataset.train), tokenize(inputs.dataset.heldout)
        kw: dict[str, Any] = {"pad_id": policy.pad_id, "device": policy.device, "dtype": policy.dtype}
        ref_c, ref_r = score_pairs(model, train_items, mode=reference, batch_size=dc.micro_batch_size, **kw)
        metrics = inputs.metrics
        trained = train_dpo(
            model,
            train_items,
            ref_c,
            ref_r,
            dc,
            progress=cfg.progress,
            on_step=lambda s: metrics.last_loss.set(s.loss),
            **kw,
        )
        gate_metrics = evaluate_candidate(
            model,
            tokenizer,
            held_items,
            cfg.gate,
            beta=dc.beta,
            reference=reference,
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
            manifest=policy.manifest(),
        )
