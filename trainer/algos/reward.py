"""The reward model as a round algorithm (`--algo reward`): trained on every kind of feedback at
once (pairs, corrections, rating gaps, thumbs, ratings), gated on held-out prompts, published as a
`reward` entry under `<adapter>-reward` (the server never serves it)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tuneloop.server.registry import REWARD

from ..config import TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset
from ..model import load_tokenizer, prepare_compute
from ..reward_gate import (
    RewardGateMetrics,
    auc,
    decide_reward,
    length_baseline_accuracy,
    pairwise_accuracy,
    pearson,
    spearman,
)
from ..reward_model import (
    Encoder,
    Item,
    PairItem,
    RewardHeads,
    build_reward_model,
    rating_margins,
    reward_scores,
    train_reward_model,
)
from .base import Candidate, RoundInputs, training_figures

# Enough completions for a steady mean and spread, few enough to score in seconds.
_STATS_SAMPLE = 512


def reward_name(adapter: str) -> str:
    """Where the reward model for policy adapter `adapter` lives in the registry."""
    return f"{adapter}-reward"


class Reward:
    name = "reward"
    uses_pointwise = True
    data_parallel = False

    def target_name(self, cfg: TrainerConfig) -> str:
        return reward_name(cfg.adapter)

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        return cfg.reward.hyperparameters()

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        return pairs, pointwise

    def train(self, inputs: RoundInputs) -> Candidate:
        cfg, rc = inputs.cfg, inputs.cfg.reward
        device, dtype = prepare_compute(cfg.compute)
        tok = load_tokenizer(inputs.model_dir)
        pad = tok.pad_token_id
        pointwise = inputs.pointwise
        if pointwise is None:  # the runner builds it for every algorithm with uses_pointwise
            raise ValueError("the reward model round was given no thumbs and ratings (RoundInputs.pointwise)")
        enc = Encoder(tok, rc)
        pairs = inputs.dataset
        margins = rating_margins(pairs.train, pointwise.examples, rc.reward_rating_margin)
        train_items: list[Item] = [enc.pair(p, m) for p, m in zip(pairs.train, margins, strict=True)]
        train_items += [enc.point(e) for e in pointwise.train]
        model = build_reward_model(inputs.model_dir, rc, cfg.compute, device, dtype, pad)
        heads = RewardHeads()
        metrics = inputs.metrics
        trained = train_reward_model(
            model, train_items, heads, rc, pad_id=pad, device=device, dtype=dtype, progress=cfg.progress,
            on_step=metrics.last_loss.set,
        )  # fmt: skip

        def score(seqs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[float]:
            return reward_scores(model, seqs, pad_id=pad, device=device, dtype=dtype).tolist()

        held = [enc.pair(p) for p in pairs.heldout]
        chosen = score([(it.prompt, it.chosen) for it in held])
        rejected = score([(it.prompt, it.rejected) for it in held])
        points = [enc.point(e) for e in pointwise.heldout]
        point_scores = score([(it.prompt, it.completion) for it in points])
        thumbs = [(s, it.value > 0) for s, it in zip(point_scores, points, strict=True) if it.kind == "thumbs"]
        rated = [(s, it.value) for s, it in zip(point_scores, points, strict=True) if it.kind == "rating"]
        train_pair_items = [it for it in train_items if isinstance(it, PairItem)]
        lengths = (
            [len(it.chosen) for it in held] + [len(it.rejected) for it in held] + [len(it.completion) for it in points]
        )
        stats_seqs = [(it.prompt, it.chosen) for it in train_pair_items][: _STATS_SAMPLE // 2]
        stats_seqs += [(it.prompt, it.rejected) for it in train_pair_items][: _STATS_SAMPLE // 2]
        stats = score(stats_seqs)
        m = RewardGateMetrics(
            heldout_pairs=len(held),
            accuracy=pairwise_accuracy(chosen, rejected),
            length_baseline_accuracy=length_baseline_accuracy(
                [(len(it.chosen), len(it.rejected)) for it in train_pair_items],
                [(len(it.chosen), len(it.rejected)) for it in held],
            ),
            margin=statistics.fmean(c - r for c, r in zip(chosen, rejected, strict=True)) if held else 0.0,
            thumbs_auc=auc([s for s, _ in thumbs], [u for _, u in thumbs]),
            rating_spearman=spearman([s for s, _ in rated], [v for _, v in rated]) if len(rated) >= 2 else None,
            length_correlation=pearson(chosen + rejected + point_scores, [float(n) for n in lengths]),
            reward_mean=statistics.fmean(stats) if stats else 0.0,
            reward_std=statistics.pstdev(stats) if len(stats) > 1 else 1.0,
            heldout_thumbs_up=sum(1 for _, up in thumbs if up),
            heldout_thumbs_down=sum(1 for _, up in thumbs if not up),
            heldout_ratings=len(rated),
        )
        verdict = decide_reward(m, rc)
        metrics.heldout_accuracy.set(m.accuracy)

        def save(out: Path) -> None:
            model.save_pretrained(str(out))

        return Candidate(
            verdict=verdict,
            metrics={
                **{k: v for k, v in m.to_dict().items() if v is not None},
                **training_figures(trained.steps, trained.seconds, trained.losses),
                "pointwise_train": len(pointwise.train),
                "pointwise_heldout": len(pointwise.heldout),
            },
            save=save,
            manifest={
                "reward_scale": {**heads.to_dict(), "mean": m.reward_mean, "std": m.reward_std},
                "dtype": str(dtype).removeprefix("torch."),
                "device": device.type,
            },
            kind=REWARD,
        )
