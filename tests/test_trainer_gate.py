"""The evaluation gate: its pure metrics and decision, and on the real model, a good candidate
passes while one trained on flipped preferences is rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_fixtures import tiny_dpo, toy_pairs

from tuneloop.trainer.config import GateConfig
from tuneloop.trainer.dpo import score_pairs, tokenize_pair, train_dpo
from tuneloop.trainer.gate import (
    GateMetrics,
    decide,
    distinct_n,
    evaluate_candidate,
    implicit_margins,
    kl_estimate,
    kl_per_token,
    preference_accuracy,
    sample_completions,
)
from tuneloop.trainer.model import build_policy, load_base_model, load_tokenizer

CPU = torch.device("cpu")


def test_pure_metrics() -> None:
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1]], 2) == 0.0
    assert preference_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == 0.5  # a tie is not a win
    assert preference_accuracy(torch.tensor([])) == 0.0
    assert kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])) == pytest.approx(0.5)
    assert kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]), [3, 1]) == pytest.approx(0.25)
    assert kl_per_token(torch.tensor([]), torch.tensor([]), []) == 0.0
    m = implicit_margins(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    assert m.item() == pytest.approx(0.5)


def metrics(**kw: object) -> GateMetrics:
    base: dict[str, object] = dict(
        heldout_pairs=10, accuracy=0.8, margin=1.0, served_accuracy=None, served_margin=None, kl=2.0, kl_per_token=0.1,
        distinct_1=0.5, distinct_2=0.8, reference_distinct_1=0.5, reference_distinct_2=0.8, samples=16,
    )  # fmt: skip
    base.update(kw)
    return GateMetrics(**base)  # type: ignore[arg-type]


def test_decide_checks_every_threshold() -> None:
    cfg = GateConfig(min_accuracy=0.6, max_kl_per_token=0.5, min_diversity_ratio=0.8)
    assert decide(metrics(), cfg).passed
    assert decide(metrics(served_accuracy=0.7, served_margin=3.0), cfg).passed
    r = decide(metrics(accuracy=0.5, kl=9.0, kl_per_token=0.6, distinct_2=0.5), cfg)
    assert not r.passed and len(r.failures) == 3
    assert "accuracy 0.500 < min_accuracy" in r.failures[0] and "KL" in r.failures[1] and "distinct-2" in r.failures[2]
    assert not decide(metrics(kl_per_token=float("nan")), cfg).passed
    # Beating the served adapter: accuracy first, then the margin breaks a tie.
    assert not decide(metrics(served_accuracy=0.9, served_margin=0.0), cfg).passed
    assert decide(metrics(served_accuracy=0.8, served_margin=0.5), cfg).passed
    assert not decide(metrics(served_accuracy=0.8, served_margin=1.0), cfg).passed
    assert decide(metrics(served_accuracy=0.9), GateConfig(beat_served=False)).passed


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    return model_dir, load_tokenizer(model_dir)


def candidate(model_dir: Path, tok, *, flip: bool):  # type: ignore[no-untyped-def]
    cfg = tiny_dpo(epochs=2, batch_size=4)
    model = build_policy(load_base_model(model_dir, CPU, torch.bfloat16), cfg)
    kw = dict(pad_id=tok.pad_token_id, device=CPU, dtype=torch.bfloat16)
    items = [tokenize_pair(tok, p, 48, 24) for p in toy_pairs(8, flip=flip)]
    train_dpo(model, items, *score_pairs(model, items, mode="base", **kw), cfg, progress=False, **kw)
    return model


GATE = GateConfig(
    min_accuracy=0.75,
    max_kl_per_token=5.0,
    min_diversity_ratio=0.3,
    eval_prompts=2,
    samples_per_prompt=2,
    sample_max_tokens=8,
)


def test_gate_accepts_a_good_candidate_and_rejects_a_bad_one(setup) -> None:  # type: ignore[no-untyped-def]
    model_dir, tok = setup
    heldout = [tokenize_pair(tok, p, 48, 24) for p in toy_pairs(4, offset=8)]  # prompts never trained on
    kw = dict(beta=0.1, reference="base", seed=0, device=CPU, dtype=torch.bfloat16)
    good = evaluate_candidate(candidate(model_dir, tok, flip=False), tok, heldout, GATE, **kw)
    bad = evaluate_candidate(candidate(model_dir, tok, flip=True), tok, heldout, GATE, **kw)
    assert good.accuracy == 1.0 and good.margin > 0 and good.samples == 4
    assert bad.accuracy == 0.0 and bad.margin < 0
    assert decide(good, GATE).passed, decide(good, GATE).failures
    verdict = decide(bad, GATE)
    assert not verdict.passed and "accuracy" in verdict.failures[0]
    # A tight KL bound turns the good candidate down too: it moved away from the base.
    assert good.kl > 0.01 and good.kl_per_token > 0.001
    assert not decide(good, GateConfig(max_kl_per_token=good.kl_per_token / 2)).passed


def test_samples_are_seeded_and_cut_at_eos(setup) -> None:  # type: ignore[no-untyped-def]
    model_dir, tok = setup
    model = build_policy(load_base_model(model_dir, CPU, torch.bfloat16), tiny_dpo())
    prompt = tuple(tokenize_pair(tok, toy_pairs(1)[0], 48, 24).prompt_ids)
    kw = dict(mode="base", n=2, max_new_tokens=6, temperature=1.0, device=CPU, dtype=torch.bfloat16)
    a = sample_completions(model, tok, [prompt], seed=1, **kw)
    b = sample_completions(model, tok, [prompt], seed=1, **kw)
    assert a == b and len(a) == 2
    for p, c in a:
        assert p == prompt and 1 <= len(c) <= 6
        assert tok.eos_token_id not in c[:-1]
