"""DPO as a round algorithm: a LoRA adapter trained on preference pairs against a frozen
reference (the base model, or the served adapter when rounds chain), gated on held-out pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainerConfig
from ..dpo import score_pairs, tokenize_pair, train_dpo
from ..gate import decide, evaluate_candidate
from ..model import SERVED, TRAINED, build_policy, load_base_model, load_tokenizer, prepare_compute
from .base import Candidate, RoundInputs, training_figures


class DPO:
    name = "dpo"
    uses_pointwise = False

    def target_name(self, cfg: TrainerConfig) -> str:
        return cfg.adapter

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        return cfg.dpo.hyperparameters()

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, dc, served = inputs.cfg, inputs.cfg.dpo, inputs.served
        device, dtype = prepare_compute(cfg.compute)
        tokenizer = load_tokenizer(inputs.model_dir)
        chain = dc.reference == "served" and served is not None
        model = build_policy(
            load_base_model(inputs.model_dir, device, dtype, cfg.compute.attn_implementation),
            dc,
            served_adapter=served.path if served else None,
            init_from_served=chain,
        )
        reference = SERVED if chain else "base"

        def tokenize(pairs: Any) -> list[Any]:
            return [tokenize_pair(tokenizer, p, dc.max_prompt_tokens, dc.max_completion_tokens) for p in pairs]

        train_items, held_items = tokenize(inputs.dataset.train), tokenize(inputs.dataset.heldout)
        kw: dict[str, Any] = {"pad_id": tokenizer.pad_token_id, "device": device, "dtype": dtype}
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
            device=device,
            dtype=dtype,
        )
        verdict = decide(gate_metrics, cfg.gate)
        if gate_metrics.accuracy is not None:
            metrics.heldout_accuracy.set(gate_metrics.accuracy)
        metrics.kl.set(gate_metrics.kl_per_token)
        metrics.gate_checked(gate_metrics.nll_increase_per_token, verdict.failed_checks)

        def save(out: Path) -> None:
            model.save_pretrained(str(out), selected_adapters=[TRAINED])

        return Candidate(
            verdict=verdict,
            metrics={
                **gate_metrics.to_dict(),
                **training_figures(trained.steps, trained.seconds, [s.loss for s in trained.log]),
            },
            save=save,
            manifest={
                "reference": f"{cfg.adapter}:{served.version}" if chain and served else "base",
                "dtype": str(dtype).removeprefix("torch."),
                "device": device.type,
            },
        )
