"""KTO: the loss on hand-computed values and against TRL's KTOTrainer, the class weights, the labels,
the fixed batches, its gate check, and a short round on the real model."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from trainer_fixtures import BAD, GOOD, QUESTIONS, ListSource, chat_prompt, tiny_config, tiny_dpo

from tuneloop.server.errors import InvalidArgument
from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import DatasetConfig, GateConfig, KTOConfig, TrainerConfig
from tuneloop.trainer.dataset import PointwiseExample, build_pointwise, kto_examples, kto_label
from tuneloop.trainer.gate import GateMetrics, auc_upper, decide, wilson_upper
from tuneloop.trainer.kto import fixed_batches, mismatched_partners, reward_auc
from tuneloop.trainer.kto_losses import balanced_weights, kto_loss, kto_reference_point
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.rows import RATING, THUMBS, CompletionRow, FeedbackRow
from tuneloop.trainer.runner import run_round

os.environ.setdefault("TQDM_DISABLE", "1")


# -- the loss, by hand ----------------------------------------------------------------------------
def test_loss_matches_hand_computed_values() -> None:
    # r = policy - ref: +1 for the desirable example, -1 for the undesirable one; z0 = 0.5, beta = 0.5.
    policy, ref = torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -3.0])
    out = kto_loss(policy, ref, torch.tensor([True, False]), 0.5, beta=0.5)
    # desirable:   1 - sigmoid(0.5 * (1 - 0.5))    = 1 - sigmoid(0.25) = 0.437823
    # undesirable: 1 - sigmoid(0.5 * (0.5 - (-1))) = 1 - sigmoid(0.75) = 0.320821
    assert out.losses.tolist() == pytest.approx([0.437823, 0.320821], abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5])
    weighted = kto_loss(policy, ref, torch.tensor([True, False]), 0.5, beta=0.5, desirable_weight=2.0,
                        undesirable_weight=0.5)  # fmt: skip
    assert weighted.losses.tolist() == pytest.approx([2 * 0.437823, 0.5 * 0.320821], abs=1e-6)


def test_at_the_reference_every_example_loses_half_its_weight_and_gradients_push_apart() -> None:
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    z0 = torch.tensor(0.0, requires_grad=True)
    out = kto_loss(policy, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), z0, beta=0.1,
                   desirable_weight=1.5, undesirable_weight=1.0)  # fmt: skip
    assert out.losses.tolist() == pytest.approx([0.75, 0.5])  # lambda * (1 - sigmoid(0))
    out.losses.sum().backward()
    assert policy.grad is not None and policy.grad[0] < 0 < policy.grad[1]  # raise desirable, lower undesirable
    assert z0.grad is None  # no gradient through the reference point


def test_reference_point_is_the_mean_mismatched_log_ratio_detached_and_clamped() -> None:
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.tensor([-1.5, -2.1]))  # log-ratios 0.5 and 0.1
    assert z0.item() == pytest.approx(0.3) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.5, -2.0])).item() == 0.0


def test_balanced_weights_follow_the_papers_rule() -> None:
    assert balanced_weights(10, 10) == (1.0, 1.0)
    assert balanced_weights(12, 10) == (1.0, 1.0)  # 1.2 is inside [1, 4/3]
    assert balanced_weights(5, 10) == (2.0, 1.0)  # fewer desirable: lambda_D up to ratio 1
    assert balanced_weights(20, 10) == pytest.approx((1.0, 1.5))  # many desirable: lambda_U up to ratio 4/3
    assert balanced_weights(0, 7) == (1.0, 1.0) and balanced_weights(7, 0) == (1.0, 1.0)
    for n_d in range(1, 40):
        for n_u in range(1, 40):
            w_d, w_u = balanced_weights(n_d, n_u)
            assert 1.0 - 1e-9 <= w_d * n_d / (w_u * n_u) <= 4 / 3 + 1e-9
            assert min(w_d, w_u) == 1.0
    with pytest.raises(ValueError):
        balanced_weights(-1, 3)


# -- labels and batches ---------------------------------------------------------------------------
def example(kind: str, value: float, cid: str = "c", prompt: str = "p") -> PointwiseExample:
    return PointwiseExample(prompt, prompt, "text", kind, value, f"e-{cid}-{value}", "r", cid)


def test_labels_from_thumbs_and_optionally_ratings() -> None:
    assert kto_label(example(THUMBS, 1)) is True and kto_label(example(THUMBS, -1)) is False
    assert [kto_label(example(RATING, v)) for v in (5, 4, 3, 2, 1)] == [True, True, None, False, False]
    assert kto_label(example(RATING, 5), ratings_as_labels=False) is None


def test_kto_examples_keep_labelled_judgements_and_say_why_the_rest_went() -> None:
    comps = [CompletionRow(f"c{i}", chat_prompt(q), GOOD) for i, q in enumerate(QUESTIONS[:4])]
    feedback = [
        FeedbackRow("t", THUMBS, "a", "c0", value=1.0), FeedbackRow("m", RATING, "b", "c1", value=3.0),
        FeedbackRow("h", RATING, "c", "c2", value=5.0), FeedbackRow("l", RATING, "d", "c3", value=1.0),
    ]  # fmt: skip
    pw = build_pointwise(comps, feedback, DatasetConfig())
    kept = kto_examples(pw)
    assert sorted(e.event_id for e in kept.examples) == ["h", "l", "t"] and kept.dropped["kto_middle_rating"] == 1
    thumbs_only = kto_examples(pw, ratings_as_labels=False)
    assert [e.event_id for e in thumbs_only.examples] == ["t"] and thumbs_only.dropped["kto_ratings_not_labels"] == 3
    assert {e.event_id for e in kept.heldout} <= {e.event_id for e in pw.heldout}  # the split is kept


def test_fixed_batches_mix_the_classes_and_pair_each_example_within_its_batch() -> None:
    labels = [True] * 9 + [False] * 9
    batches = fixed_batches(labels, 4, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(18))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2]
    assert all({labels[i] for i in b} == {True, False} for b in batches)
    assert fixed_batches(labels, 4, seed=3) == batches and fixed_batches(labels, 4, seed=4) != batches
    assert [len(b) for b in fixed_batches([True] * 3 + [False] * 10, 4, seed=0)] == [4, 4, 5]  # no batch of one
    # TRL's rotation by one: (x_3, y_2), (x_1, y_3), (x_2, y_1) and (x_0, y_4), (x_4, y_0).
    assert mismatched_partners([[3, 1, 2], [0, 4]], 5) == [4, 3, 1, 2, 0]
    with pytest.raises(ValueError, match="batches of at least 2"):
        fixed_batches([True, False], 1, seed=0)


# -- the gate's check -----------------------------------------------------------------------------
def test_reward_auc_and_gap() -> None:
    assert reward_auc([0.3, 0.1, 0.2], [True, False, False]) == pytest.approx((1.0, 0.15))
    assert reward_auc([0.1, 0.1, 0.3, 0.0], [True, False, True, False]) == pytest.approx((0.875, 0.15))  # tie: half
    assert reward_auc([0.1, 0.2], [True, True]) == (None, None)


def kto_metrics(**kw: object) -> GateMetrics:
    base: dict[str, object] = dict(
        heldout_pairs=0, accuracy=None, margin=None, served_accuracy=None, served_margin=None, kl=0.1,
        kl_per_token=0.01, distinct_1=0.5, distinct_2=0.8, reference_distinct_1=0.5, reference_distinct_2=0.8,
        samples=8, heldout_desirable=20, heldout_undesirable=20, reward_auc=0.7, reward_gap=0.3,
    )  # fmt: skip
    base.update(kw)
    return GateMetrics(**base)  # type: ignore[arg-type]


def test_gate_rejects_an_auc_below_the_bound_beyond_noise() -> None:
    cfg = GateConfig()
    assert decide(kto_metrics(), cfg).passed
    # 0.4 over 5 + 5 examples is noise (the upper bound is above 0.5); 0.3 over 40 + 40 is not.
    assert decide(kto_metrics(reward_auc=0.4, heldout_desirable=5, heldout_undesirable=5), cfg).passed
    bad = decide(kto_metrics(reward_auc=0.3, heldout_desirable=40, heldout_undesirable=40), cfg)
    assert bad.failed_checks == ["reward_auc"] and "min_reward_auc 0.500" in bad.failures[0]
    missing = decide(kto_metrics(reward_auc=None, reward_gap=None, heldout_desirable=6, heldout_undesirable=0), cfg)
    assert missing.failed_checks == ["reward_auc"] and "6 desirable, 0 undesirable" in missing.failures[0]
    served = decide(kto_metrics(served_reward_auc=0.8, served_reward_gap=0.1), cfg)
    assert served.failed_checks == ["beat_served"]
    assert decide(kto_metrics(served_reward_auc=0.8), GateConfig(beat_served=False)).passed
    assert auc_upper(0.3, 40, 1000) == wilson_upper(0.3, 40)  # the smaller class sets the noise
    assert decide(kto_metrics(reward_auc=0.3, heldout_desirable=None, heldout_undesirable=None), cfg).passed  # not KTO


def test_kto_config_validation() -> None:
    with pytest.raises(InvalidArgument, match="kto_beta"):
        KTOConfig(kto_beta=0)
    with pytest.raises(InvalidArgument, match="weight"):
        KTOConfig(kto_undesirable_weight=0)
    with pytest.raises(InvalidArgument, match="batch_size >= 2"):
        TrainerConfig(algo="kto", dpo=tiny_dpo(batch_size=1))


# -- parity with TRL on the real model -----------------------------------------------------------
UNPAIRED = [
    ("What should I cook tonight?", "A warm vegetable soup would be lovely.", True),
    ("How do I stay focused?", "You can't.", False),
    ("Suggest a weekend hobby.", "Painting outdoors is relaxing and fun!", True),
    ("Any tip for better sleep?", "No idea, go away.", False),
    ("How do I make tea?", "Steep the leaves in hot water for three minutes.", True),
]


@pytest.fixture(scope="module")
def trl_kto(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig as TRLConfig
    from trl import KTOTrainer

    from tuneloop.server.model_cache import ensure_default_model
    from tuneloop.trainer.config import DPOConfig
    from tuneloop.trainer.model import load_tokenizer, lora_config

    model_dir = ensure_default_model()
    tok = load_tokenizer(model_dir)
    rows = [
        {"prompt": chat_prompt(q), "completion": c, "label": label} for q, c, label in UNPAIRED
    ]  # fmt: skip
    args = TRLConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-kto")), use_cpu=True, bf16=False, beta=0.1, max_length=None,
        report_to=[], per_device_train_batch_size=len(rows), dataloader_num_workers=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
            peft_config=lora_config(DPOConfig()),
        )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, batch


def _set_adapter(trainer, batch, how: str) -> None:  # type: ignore[no-untyped-def]
    """Move the LoRA away from its zero init: random B (every completion less likely: the KL
    estimate is negative and z0 clamps to 0), or a step of likelihood training on the completions
    (likelier under any prompt: z0 > 0)."""
    from tuneloop.trainer.model import completion_logps

    model = trainer.model
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if how == "random" else 0.0))
    if how == "likelihood":  # one SGD step (its zero-init B gets the whole update)
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        (-logps.mean()).backward()
        torch.optim.SGD(lora, lr=0.1).step()
        model.zero_grad(set_to_none=True)
    model.eval()


def _our_kto(model, batch, w_d: float, w_u: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    from tuneloop.trainer.model import completion_logps

    def logps() -> tuple[torch.Tensor, torch.Tensor]:
        matched = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl = completion_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        return matched, kl

    with torch.no_grad():
        policy, policy_kl = logps()
        with model.disable_adapter():
            ref, ref_kl = logps()
    z0 = kto_reference_point(policy_kl, ref_kl)
    out = kto_loss(policy, ref, torch.as_tensor(batch["label"]), z0, beta=0.1, desirable_weight=w_d,
                   undesirable_weight=w_u)  # fmt: skip
    return float(out.losses.mean()), float(z0)


@pytest.mark.parametrize(("how", "w_d", "w_u"), [("random", 1.0, 1.0), ("likelihood", 1.3, 0.7)])
def test_loss_matches_trl_kto_trainer(trl_kto, how: str, w_d: float, w_u: float) -> None:  # type: ignore[no-untyped-def]
    trainer, batch = trl_kto
    _set_adapter(trainer, batch, how)
    trainer.desirable_weight, trainer.undesirable_weight = w_d, w_u
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    ours, z0 = _our_kto(trainer.model, batch, w_d, w_u)
    assert (z0 == 0.0) == (how == "random"), z0  # both sides of the clamp are exercised
    assert abs(theirs - 0.5 * (3 * w_d + 2 * w_u) / 5) > 1e-3, "the adapter must move the loss off its start"
    assert ours == pytest.approx(theirs, abs=1e-4)


# -- a round on the real model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir() -> Path:
    from tuneloop.server.model_cache import ensure_default_model

    return ensure_default_model()


def thumbs_only() -> ListSource:
    """A thumb up on the friendly reply and a thumb down on the curt one, for every question; a
    middle rating that KTO leaves out."""
    comps, feedback = [], []
    for i, q in enumerate(QUESTIONS):
        good, bad = CompletionRow(f"g{i}", chat_prompt(q), GOOD), CompletionRow(f"b{i}", chat_prompt(q), BAD)
        comps += [good, bad]
        feedback.append(FeedbackRow(f"u{i}", THUMBS, f"r{i % 3}", good.completion_id, value=1.0, created_at=i))
        feedback.append(FeedbackRow(f"d{i}", THUMBS, f"s{i % 3}", bad.completion_id, value=-1.0, created_at=i))
    feedback.append(FeedbackRow("mid", RATING, "x", "g0", value=3.0, created_at=99.0))
    return ListSource(comps, feedback)


def test_a_kto_round_lowers_its_loss_changes_the_adapter_and_records_its_settings(
    tmp_path: Path, model_dir: Path
) -> None:
    # 24 thumbs: 18 train examples (two batches of 9, two epochs: 4 steps), 6 held out; the dtype
    # is the one `fastest_dtype("auto")` picks (bf16 where the CPU has native bf16 math).
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = tiny_config(str(reg.root), str(model_dir), algo="kto", dpo=tiny_dpo(batch_size=9, epochs=2))
    metrics = TrainerMetrics(CollectorRegistry())
    result = run_round(cfg, thumbs_only(), reg, metrics=metrics)
    assert result.outcome == "published", result.summary()
    assert result.algorithm == "kto" and result.train_pairs == 0 and result.train_judgements == 18
    manifest = reg.get("toy", "v1").manifest
    m = manifest["metrics"]
    assert manifest["algorithm"] == "kto" and manifest["hyperparameters"]["kto"] == KTOConfig().hyperparameters()
    assert "beta" not in manifest["hyperparameters"]["policy"] and manifest["hyperparameters"]["policy"]["lora_r"] == 8
    assert manifest["kto_weights"] == {"desirable": 1.0, "undesirable": 1.0}  # 9 and 9: already balanced
    assert (m["train_desirable"], m["train_undesirable"], m["steps"]) == (9, 9, 4)
    assert manifest["data_snapshot"]["event_ids"] == []  # pairs are not KTO's data
    used = manifest["pointwise_snapshot"]["event_ids"]
    assert len(used) == 24 and "mid" not in used  # the middle rating is no label
    # At the start policy == reference, so every example loses half its weight, up to bf16 rounding
    # (the reference was scored in batches of another make-up; see tests/test_trainer_dpo.py).
    assert m["first_loss"] == pytest.approx(0.5, abs=0.03)
    assert m["last_loss"] < 0.5 * m["first_loss"], m["loss_curve"]
    # Held out: 3 prompts, each with a thumbed-up and a thumbed-down reply, ranked right.
    assert (m["heldout_desirable"], m["heldout_undesirable"]) == (3, 3)
    assert m["reward_auc"] == 1.0 and m["reward_gap"] > 0
    adapter = load_file(str(reg.get("toy", "v1").path / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # moved off its zero init
    assert sample(metrics, "tuneloop_trainer_examples") == 18
    json.dumps(manifest, allow_nan=False)  # the manifest is plain JSON


def sample(metrics: TrainerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)
