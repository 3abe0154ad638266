"""KTO as a round algorithm (`--algo kto`): a LoRA adapter trained on unpaired thumbs (and,
optionally, ratings read as desirable or undesirable) against a frozen reference, gated on the
implicit reward's AUC between held-out desirable and undesirable examples."""

from __future__ import annotations

from typing import Any

from ..config import TrainerConfig
from ..dataset import PointwiseDataset, PointwiseExample, PreferenceDataset, kto_examples, kto_label
from ..kto import TokenizedExample, evaluate_kto, prepare_kto, tokenize_example, train_kto
from ..kto_losses import balanced_weights
from .base import Candidate, RoundInputs, gate_verdict, load_policy, training_figures

# DPO's settings that KTO does not read: the rest (reference, optimizer, LoRA, token limits, seed) it shares.
_DPO_ONLY = ("loss_type", "beta", "label_smoothing")


class KTO:
    name = "kto"
    uses_pointwise = True
    data_parallel = False

    def target_name(self, cfg: TrainerConfig) -> str:
        return cfg.adapter

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        shared = {k: v for k, v in cfg.dpo.hyperparameters().items() if k not in _DPO_ONLY}
        return {"kto": cfg.kto.hyperparameters(), "policy": shared}

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        # No pairs: a round's pairs are neither trained on nor recorded as used, so a later DPO
        # round (say, picked by --algo auto) still counts them as new.
        if pointwise is None:
            raise ValueError("KTO learns from thumbs and ratings; the round built none")
        return PreferenceDataset([], [], pairs.dropped), kto_examples(pointwise, cfg.kto.kto_ratings_as_labels)

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, dc, kc = inputs.cfg, inputs.cfg.dpo, inputs.cfg.kto
        if inputs.pointwise is None:  # the runner builds it for every algorithm with uses_pointwise
            raise ValueError("the KTO round was given no thumbs and ratings (RoundInputs.pointwise)")
        policy = load_policy(inputs, dc)

        def tokenize(examples: list[PointwiseExample]) -> list[TokenizedExample]:
            return [
                tokenize_example(policy.tokenizer, e, kto_label(e, kc.kto_ratings_as_labels) is True,
                                 dc.max_prompt_tokens, dc.max_completion_tokens)
                for e in examples
            ]  # fmt: skip

        kw: dict[str, Any] = {"pad_id": policy.pad_id, "device": policy.device, "dtype": policy.dtype}
        data = prepare_kto(policy.model, tokenize(inputs.pointwise.train), dc, reference=policy.reference, **kw)
        n_d = data.n_desirable
        n_u = len(data.items) - n_d
        fixed = (kc.kto_desirable_weight, kc.kto_undesirable_weight)
        weights = balanced_weights(n_d, n_u) if kc.kto_balance_classes else fixed
        metrics = inputs.metrics
        trained = train_kto(
            policy.model, data, dc, beta=kc.kto_beta, weights=weights, progress=cfg.progress,
            on_step=lambda s: metrics.last_loss.set(s.loss), **kw,
        )  # fmt: skip
        gate_metrics = evaluate_kto(
            policy.model, policy.tokenizer, tokenize(inputs.pointwise.heldout), cfg.gate, beta=kc.kto_beta,
            reference=policy.reference, seed=dc.seed, device=policy.device, dtype=policy.dtype,
        )  # fmt: skip
        return Candidate(
            verdict=gate_verdict(gate_metrics, inputs),
            metrics={
                **{k: v for k, v in gate_metrics.to_dict().items() if v is not None},
                **training_figures(trained.steps, trained.seconds, [s.loss for s in trained.log]),
                "train_desirable": n_d,
                "train_undesirable": n_u,
                "kl_curve": [round(s.kl, 6) for s in trained.log],  # z0 of every step
            },
            save=policy.save,
            manifest={
                **policy.manifest(),
                # The weights in effect: set from the class counts unless --no-kto-balance-classes.
                "kto_weights": {"desirable": weights[0], "undesirable": weights[1]},
                "kto_batches": len(data.batches),
            },
        )
