"""RLHF as a round algorithm (`--algo ppo`): make sure the reward model has seen the round's
feedback (train and publish a new one if not), then PPO on a LoRA policy against it, gated by the
shared sample checks plus the reward model's gain on held-out prompts."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from tuneloop.server.domain import prompt_sha256
from tuneloop.server.errors import FailedPrecondition, NotFound
from tuneloop.server.registry import REWARD, AdapterVersion

from ..config import DPOConfig, TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset, heldout_score
from ..gate import GateMetrics, evaluate_samples
from ..model import SERVED, TRAINED, build_policy, load_base_model, load_tokenizer, prepare_compute
from ..ppo import PPOResult, RewardScorer, train_ppo
from ..report import write_ppo_report
from ..reward_model import load_reward_backbone, load_reward_model, reward_scores
from .base import Candidate, RoundInputs, gate_verdict
from .reward import reward_name

log = logging.getLogger(__name__)


class PPO:
    name = "ppo"
    uses_pointwise = True  # through its reward model
    data_parallel = False

    def target_name(self, cfg: TrainerConfig) -> str:
        return cfg.adapter

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        return {"ppo": cfg.ppo.hyperparameters(), "reward": cfg.reward.hyperparameters()}

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        return pairs, pointwise

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, pc = inputs.cfg, inputs.cfg.ppo
        rm = self._reward_model(inputs)
        device, dtype = prepare_compute(cfg.compute)
        tok = load_tokenizer(inputs.model_dir)
        pad = tok.pad_token_id
        completions, _ = inputs.source.load()
        held_hashes = {p.prompt_hash for p in inputs.dataset.heldout}
        salt, frac = cfg.data.split_salt, cfg.data.heldout_fraction
        train_prompts: list[tuple[int, ...]] = []
        held_prompts: list[tuple[int, ...]] = []
        for text in dict.fromkeys(c.prompt_text for c in completions):
            h = prompt_sha256(text)
            ids = tuple(tok(text, add_special_tokens=False)["input_ids"][-pc.ppo_max_prompt_tokens :])
            (held_prompts if h in held_hashes or heldout_score(h, salt) < frac else train_prompts).append(ids)
        if not train_prompts or not held_prompts:
            raise FailedPrecondition(
                f"PPO needs logged prompts on both sides of the held-out split; found {len(train_prompts)} to "
                f"train on and {len(held_prompts)} held out"
            )
        served = inputs.served
        chain = pc.ppo_reference == "served" and served is not None
        policy = build_policy(
            load_base_model(inputs.model_dir, device, dtype, cfg.compute.attn_implementation),
            _policy_lora(cfg),
            served_adapter=served.path if served else None,
            init_from_served=chain,
        )
        reference = SERVED if chain else "base"
        reward_model = load_reward_model(inputs.model_dir, rm.path, cfg.compute, device, dtype, pad)
        # The critic starts as the reward model (LoRA and head), now trainable, read at every token.
        critic = PeftModel.from_pretrained(
            load_reward_backbone(inputs.model_dir, cfg.compute, dtype, pad), str(rm.path), is_trainable=True
        ).to(device)
        scale = rm.manifest.get("reward_scale", {})
        scorer = RewardScorer(
            score=lambda seqs: reward_scores(reward_model, seqs, pad_id=pad, device=device, dtype=dtype),
            mean=float(scale.get("mean", 0.0)),
            std=float(scale.get("std", 1.0)) or 1.0,
        )
        metrics = inputs.metrics
        result = train_ppo(
            policy, critic, scorer, tok, train_prompts, pc, reference=reference, device=device, dtype=dtype,
            progress=cfg.progress, on_iteration=metrics.ppo_iteration,
        )  # fmt: skip
        del critic
        fields, samples = evaluate_samples(
            policy, tok, held_prompts, cfg.gate, reference=reference, seed=pc.ppo_seed, device=device, dtype=dtype
        )
        with torch.no_grad():
            cand_score = scorer.score(samples.candidate).mean().item()
            ref_score = scorer.score(samples.reference).mean().item()
        gate_metrics = GateMetrics(
            heldout_pairs=len(held_prompts), accuracy=None, margin=None, served_accuracy=None, served_margin=None,
            reward_gain=cand_score - ref_score, **fields,
        )  # fmt: skip
        verdict = gate_verdict(gate_metrics, inputs)

        def save(out: Path) -> None:
            policy.save_pretrained(str(out), selected_adapters=[TRAINED])
            write_ppo_report(out, result, gate_metrics, reward=f"{rm.name}@{rm.version}")

        return Candidate(
            verdict=verdict,
            metrics={
                **{k: v for k, v in gate_metrics.to_dict().items() if v is not None},
                "candidate_reward": cand_score,
                "reference_reward": ref_score,
                **_summary(result),
            },
            save=save,
            manifest={
                "reference": f"{cfg.adapter}:{served.version}" if chain and served else "base",
                "reward_model": {"name": rm.name, "version": rm.version},
                "ppo": result.to_dict(),
                "report": "report.md",
                "dtype": str(dtype).removeprefix("torch."),
                "device": device.type,
            },
        )

    @staticmethod
    def _reward_model(inputs: RoundInputs) -> AdapterVersion:
        """The reward model to optimise against, refreshed by a reward round on this data (a
        duplicate, not a retrain, when the current one already trained on it)."""
        from ..runner import run_round  # noqa: PLC0415 - the runner imports the algorithms

        cfg = inputs.cfg
        rm_round = run_round(
            dataclasses.replace(cfg, algo="reward"), inputs.source, inputs.registry, metrics=inputs.metrics,
            dataset=inputs.dataset, pointwise=inputs.pointwise,
        )  # fmt: skip
        if rm_round.outcome not in ("published", "duplicate", "rejected"):
            raise FailedPrecondition(f"the reward model round did not run: {rm_round.outcome}: {rm_round.reason}")
        try:
            rm = inputs.registry.resolve(reward_name(cfg.adapter))
        except NotFound as exc:
            raise FailedPrecondition(
                f"no accepted reward model to run PPO against ({rm_round.outcome}: {rm_round.reason})"
            ) from exc
        if rm.kind != REWARD:
            raise FailedPrecondition(f"{rm.name}@{rm.version} is not a reward model")
        if rm_round.outcome == "rejected":
            log.warning("ppo: the new reward model was rejected (%s); using %s", rm_round.reason, rm.version)
        return rm


def _policy_lora(cfg: TrainerConfig) -> DPOConfig:
    """The policy's LoRA shape in the form `build_policy` reads; no dropout, which would make the
    rollout and update log-probs differ and so bias the PPO ratio."""
    pc = cfg.ppo
    return dataclasses.replace(
        cfg.dpo, lora_r=pc.ppo_lora_r, lora_alpha=pc.ppo_lora_alpha, lora_targets=list(pc.ppo_lora_targets),
        lora_dropout=0.0, seed=pc.ppo_seed,
    )  # fmt: skip


def _summary(result: PPOResult) -> dict[str, Any]:
    its = result.iterations
    if not its:
        return {"ppo_iterations": 0}
    first, last = its[0], its[-1]
    return {
        "ppo_iterations": len(its),
        "ppo_first_score": first.score,
        "ppo_last_score": last.score,
        "ppo_last_kl_per_token": last.kl_per_token,
        "ppo_seconds": result.seconds,
        "ppo_rollout_seconds": sum(s.rollout_seconds for s in its),
        "ppo_score_seconds": sum(s.score_seconds for s in its),
        "ppo_reference_seconds": sum(s.reference_seconds for s in its),
        "ppo_update_seconds": sum(s.update_seconds for s in its),
    }
