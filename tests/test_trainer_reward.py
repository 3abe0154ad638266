"""The reward model on the real model: trained from pairs, thumbs and ratings at once, it ranks
held-out pairs of a synthetic preference, and is published as a `reward` entry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from trainer_fixtures import BAD, GOOD, QUESTIONS, ListSource, chat_prompt, tiny_config, toy_rows

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import RewardConfig, SidecarConfig
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.rows import RATING, THUMBS, CompletionRow, FeedbackRow
from tuneloop.trainer.runner import run_round
from tuneloop.trainer.sidecar import Sidecar


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from tuneloop.server.model_cache import ensure_default_model

    return ensure_default_model()


# Longer than GOOD: with it on half the prompts, length alone cannot tell the replies apart.
BAD_LONG = "No. Figure it out yourself, I am not going to spend any of my time on this question."


def mixed_feedback() -> ListSource:
    """Pairs on every prompt, plus a thumb and a rating on each reply."""
    completions, feedback = toy_rows(QUESTIONS)
    completions = [
        replace(c, text=BAD_LONG) if c.text == BAD and i % 4 == 1 else c for i, c in enumerate(completions)
    ]
    for i, c in enumerate(completions):
        good = c.text == GOOD
        thumb, rating = (1.0, 5.0) if good else (-1.0, 1.0)
        feedback.append(FeedbackRow(f"t{i}", THUMBS, f"u{i % 5}", c.completion_id, value=thumb, created_at=50.0 + i))
        feedback.append(FeedbackRow(f"s{i}", RATING, f"v{i % 5}", c.completion_id, value=rating, created_at=99.0 + i))
    assert {c.text for c in completions} == {GOOD, BAD, BAD_LONG}
    return ListSource(completions, feedback)


def test_a_reward_model_learns_the_preference_and_is_published_as_a_reward_entry(
    tmp_path: Path, model_dir: Path
) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    rc = RewardConfig(
        reward_epochs=3, reward_batch_size=4, reward_learning_rate=1e-3, reward_max_prompt_tokens=48,
        reward_max_completion_tokens=24,
    )  # fmt: skip
    cfg = tiny_config(str(reg.root), str(model_dir), algo="reward", reward=rc)
    result = run_round(cfg, mixed_feedback(), reg)
    assert result.outcome == "published", result.reason
    assert reg.names() == ["toy-reward"]  # the policy name is untouched
    v = reg.get("toy-reward", "v1")
    assert v.kind == "reward" and reg.channel("toy-reward") == "v1" and reg.canary("toy-reward") is None
    m = v.manifest["metrics"]
    assert m["accuracy"] == 1.0 and m["heldout_pairs"] >= 2 and m["margin"] > 0
    assert m["thumbs_auc"] == 1.0 and m["rating_spearman"] > 0.5
    assert m["last_loss"] < m["first_loss"]
    scale = v.manifest["reward_scale"]
    assert scale["std"] > 0 and len(scale["rating_thresholds"]) == 4
    assert scale["rating_thresholds"] == sorted(scale["rating_thresholds"])
    weights = load_file(str(v.path / "adapter_model.safetensors"))
    assert any("score" in k for k in weights), sorted(weights)[:5]  # the head travels with the adapter
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero: it trained


def test_thumbs_alone_start_a_reward_round_and_train_a_model_gated_on_their_auc(
    tmp_path: Path, model_dir: Path
) -> None:
    """Users who only leave thumbs, one reply per prompt: no pair exists, and the sidecar still
    trains a reward model (each thumb counts as an example) that the gate checks by thumbs AUC."""
    prompts = [chat_prompt(q) for q in QUESTIONS] + [chat_prompt(f"{q} Keep it short.") for q in QUESTIONS]
    completions = [CompletionRow(f"c{i}", p, GOOD if i % 2 else BAD) for i, p in enumerate(prompts)]
    feedback = [
        FeedbackRow(f"t{i}", THUMBS, f"u{i % 5}", c.completion_id, value=1.0 if c.text == GOOD else -1.0,
                    created_at=float(i))
        for i, c in enumerate(completions)
    ]  # fmt: skip
    reg = AdapterRegistry(tmp_path / "reg")
    rc = RewardConfig(reward_epochs=3, reward_batch_size=4, reward_learning_rate=1e-3, reward_max_prompt_tokens=48,
                      reward_max_completion_tokens=24)  # fmt: skip
    cfg = tiny_config(str(reg.root), str(model_dir), algo="reward", reward=rc)
    cfg.sidecar = SidecarConfig(min_new_pairs=len(feedback), min_new_pairs_periodic=1, metrics_port=0)
    sidecar = Sidecar(cfg, ListSource(completions, feedback[:-1]), reg, TrainerMetrics(CollectorRegistry()))
    assert sidecar.tick() is None  # one thumb short of min_new_pairs
    sidecar.source = ListSource(completions, feedback)
    result = sidecar.tick()
    assert result is not None and result.outcome == "published", result and result.summary()
    assert (result.train_pairs, result.heldout_pairs) == (0, 0)
    assert result.train_judgements and result.heldout_judgements
    assert result.train_judgements + result.heldout_judgements == len(feedback)
    v = reg.get("toy-reward", "v1")
    assert v.manifest["metrics"]["thumbs_auc"] >= 0.6 and v.manifest["metrics"]["heldout_pairs"] == 0
    assert v.manifest["pointwise_snapshot"]["event_ids"] == sorted(f.event_id for f in feedback)
    assert sidecar.tick() is None  # those thumbs are used: nothing new


def test_new_thumbs_alone_make_a_new_reward_run_but_not_a_new_dpo_run() -> None:
    from tuneloop.trainer.config import DatasetConfig
    from tuneloop.trainer.dataset import build_dataset, build_pointwise
    from tuneloop.trainer.runner import data_digest

    source = mixed_feedback()
    completions, feedback = source.load()
    more = [*feedback, FeedbackRow("t-new", THUMBS, "u-new", completions[0].completion_id, value=1.0, created_at=500.0)]
    cfg = DatasetConfig()
    pairs, pairs_after = build_dataset(completions, feedback, cfg), build_dataset(completions, more, cfg)
    assert pairs.snapshot()["digest"] == pairs_after.snapshot()["digest"]  # a thumb is not a pair
    digest = pairs.snapshot()["digest"]
    assert data_digest(digest, None) == digest
    before = data_digest(digest, build_pointwise(completions, feedback, cfg))
    assert before != digest
    assert data_digest(digest, build_pointwise(completions, more, cfg)) != before
    assert data_digest(digest, build_pointwise(completions, list(reversed(feedback)), cfg)) == before
