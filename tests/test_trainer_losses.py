"""The preference losses: hand-computed values, and parity with TRL's DPOTrainer on a real model."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from tuneloop.trainer.losses import completion_positions, gathered_token_logps, preference_loss, sum_by_row

os.environ.setdefault("TQDM_DISABLE", "1")

# policy (chosen, rejected) = (-1, -2), reference = (-1.5, -1.5): h = 0.5 - (-0.5) = 1.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))


def test_sigmoid_matches_hand_computed() -> None:
    out = preference_loss(PC, PR, RC, RR, beta=0.5)
    # -log sigmoid(0.5 * 1) = log(1 + e^-0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.474077, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)
    assert out.margins.item() == pytest.approx(0.5)


def test_label_smoothing_is_conservative_dpo() -> None:
    out = preference_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5)
    assert out.losses.item() == pytest.approx(0.9 * 0.474077 + 0.1 * 0.974077, abs=1e-6)


def test_ipo_averages_log_ratios_per_token() -> None:
    out = preference_loss(
        PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4])
    )
    # h_avg = 0.5 / 2 - (-0.5) / 4 = 0.375; (0.375 - 1 / (2 * 0.5))^2
    assert out.losses.item() == pytest.approx(0.390625, abs=1e-6)


def test_zero_margin_is_log2_and_gradient_pushes_the_right_way() -> None:
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    out = preference_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2))
    out.losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # raise chosen, lower rejected


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="ipo loss needs"):
        preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")


def test_log_prob_helpers() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    rows, cols = completion_positions(mask)
    # position t predicts token t + 1: completion tokens at (0,2),(0,3),(1,1),(1,2)
    assert rows.tolist() == [0, 0, 1, 1] and cols.tolist() == [1, 2, 0, 1]
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    lp = gathered_token_logps(logits, torch.tensor([1, 0]))
    assert lp.tolist() == pytest.approx([math.log(0.5), math.log(0.75)])
    assert sum_by_row(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 2]), 3).tolist() == [3.0, 0.0, 3.0]


def test_chunked_token_logps_match_log_softmax_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.trainer import losses

    monkeypatch.setattr(losses._TargetLogProbs, "CHUNK", 3)  # several chunks, one ragged
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (10,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: gathered_token_logps(x, targets), (logits,))
    weights = torch.randn(10, generator=gen, dtype=torch.float64)
    (gathered_token_logps(logits, targets) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1) * weights).sum().backward()
    assert torch.allclose(ours, logits.grad)
    bf16 = logits.detach().bfloat16()
    assert gathered_token_logps(bf16, targets).dtype == torch.float32


# -- parity with TRL on the real model -----------------------------------------------------------
PAIRS = [
    ("What should I cook tonight?", "A warm vegetable soup would be lovely.", "I don't care."),
    ("How do I stay focused?", "Try short breaks and a tidy desk.", "You can't."),
    ("Suggest a weekend hobby.", "Painting outdoors is relaxing and fun!", "Nothing, stay home."),
]


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tuneloop.server.model_cache import ensure_default_model
    from tuneloop.trainer.config import DPOConfig as OurConfig
    from tuneloop.trainer.model import load_tokenizer, lora_config

    model_dir = ensure_default_model()
    tok = load_tokenizer(model_dir)
    rows = [
        {
            "prompt": tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            "chosen": c,
            "rejected": r,
        }
        for q, c, r in PAIRS
    ]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False, beta=0.1, max_length=None,
        report_to=[], per_device_train_batch_size=len(PAIRS), dataloader_num_workers=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
            peft_config=lora_config(OurConfig()),
        )  # fmt: skip
    # Move the adapter away from its zero init so policy and reference (adapter disabled) differ.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    trainer.model.eval()
    return trainer, tok, rows


def _trl_loss(trainer, batch, loss_type: str, label_smoothing: float = 0.0) -> float:  # type: ignore[no-untyped-def]
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = label_smoothing
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def _our_loss(model, batch, loss_type: str, label_smoothing: float = 0.0) -> float:  # type: ignore[no-untyped-def]
    from tuneloop.trainer.dpo import PairBatch, pair_logps

    pb = PairBatch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pb, torch.float32)
        with model.disable_adapter():
            ref_c, ref_r = pair_logps(model, pb, torch.float32)
    len_c, len_r = pb.completion_lengths()
    out = preference_loss(
        chosen, rejected, ref_c, ref_r, beta=0.1, label_smoothing=label_smoothing, loss_type=loss_type,
        chosen_lengths=len_c, rejected_lengths=len_r,
    )  # fmt: skip
    return float(out.losses.mean())


def test_our_tokenization_matches_trl(trl_trainer) -> None:  # type: ignore[no-untyped-def]
    from tuneloop.server.domain import prompt_sha256
    from tuneloop.trainer.dpo import collate_pairs, tokenize_pair
    from tuneloop.trainer.rows import PreferencePair

    trainer, tok, rows = trl_trainer
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = collate_pairs(
        [
            tokenize_pair(
                tok,
                PreferencePair(
                    r["prompt"], prompt_sha256(r["prompt"]), r["chosen"], r["rejected"], "t", (), (), "", ""
                ),
                512,
                512,
            )
            for r in rows
        ],
        tok.pad_token_id,
    )
    assert torch.equal(ours.input_ids, trl_batch["input_ids"])
    assert torch.equal(ours.attention_mask, trl_batch["attention_mask"])
    assert torch.equal(ours.completion_mask, trl_batch["completion_mask"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_matches_trl_dpo_trainer(trl_trainer, loss_type: str) -> None:  # type: ignore[no-untyped-def]
    trainer, _tok, rows = trl_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs = _trl_loss(trainer, batch, loss_type)
    ours = _our_loss(trainer.model, batch, loss_type)
    assert abs(theirs - math.log(2)) > 1e-3, "the adapter must differ from the reference for a real check"
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_label_smoothing_matches_trl_per_pair(trl_trainer) -> None:  # type: ignore[no-untyped-def]
    # TRL's sigmoid loss has no label smoothing; its "aot" loss is cDPO up to a sort over the
    # batch, which is the identity for a batch of one pair.
    trainer, _tok, rows = trl_trainer
    for i in range(len(rows)):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        assert _our_loss(trainer.model, batch, "sigmoid", 0.2) == pytest.approx(
            _trl_loss(trainer, batch, "aot", 0.2), abs=1e-4
        )
