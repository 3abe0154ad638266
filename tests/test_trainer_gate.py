"""The evaluation gate: its pure metrics and decision, and on the real model, a good candidate
passes while one trained on flipped preferences is rejected."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from trainer_fixtures import tiny_dpo, toy_pairs

from tuneloop.server.hardware import fastest_dtype
from tuneloop.trainer.config import GateConfig
from tuneloop.trainer.dpo import score_pairs, tokenize_pair, train_dpo
from tuneloop.trainer.gate import (
    GateMetrics,
    cutoff_share,
    decide,
    distinct_n,
    empty_share,
    evaluate_candidate,
    implicit_margins,
    kl_estimate,
    kl_per_token,
    nll_per_token,
    non_language_share,
    preference_accuracy,
    repetition_share,
    sample_completions,
    sanity,
    wilson_upper,
)
from tuneloop.trainer.model import build_policy, load_base_model, load_tokenizer

CPU = torch.device("cpu")
# What `dtype auto` picks on this host: bf16 only where its math is native (3x slower emulated).
CPU_DT = getattr(torch, fastest_dtype("auto", "cpu"))


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


def test_accuracy_fails_only_beyond_sampling_noise() -> None:
    assert wilson_upper(0.0, 4) == pytest.approx(0.4035, abs=1e-3)
    assert wilson_upper(0.5, 0) == 1.0
    cfg = GateConfig(min_accuracy=0.5)
    # The sentiment closed loop's adapter (gain +0.57) on its 69 noisy held-out pairs: passes.
    assert decide(metrics(accuracy=0.493, heldout_pairs=69), cfg).passed
    # A candidate that learned the preference backwards: fails.
    assert decide(metrics(accuracy=0.35, heldout_pairs=69), cfg).failed_checks == ["accuracy"]


def test_decide_checks_every_threshold() -> None:
    cfg = GateConfig(min_accuracy=0.6, max_kl_per_token=0.5, min_diversity_ratio=0.8)
    assert decide(metrics(), cfg).passed
    assert decide(metrics(served_accuracy=0.7, served_margin=3.0), cfg).passed
    r = decide(metrics(accuracy=0.5, heldout_pairs=400, kl=9.0, kl_per_token=0.6, distinct_2=0.5), cfg)
    assert not r.passed and len(r.failures) == 3
    assert "accuracy 0.500 over 400 pairs" in r.failures[0] and "< min_accuracy 0.600" in r.failures[0]
    assert "KL" in r.failures[1] and "distinct-2" in r.failures[2]
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
    model = build_policy(load_base_model(model_dir, CPU, CPU_DT), cfg)
    kw = dict(pad_id=tok.pad_token_id, device=CPU, dtype=CPU_DT)
    items = [tokenize_pair(tok, p, 48, 24) for p in toy_pairs(8, flip=flip)]
    train_dpo(model, items, *score_pairs(model, items, mode="base", **kw), cfg, progress=False, **kw)
    return model


GATE = GateConfig(
    min_accuracy=0.75,
    max_kl_per_token=5.0,
    max_nll_increase_per_token=5.0,  # eight toy pairs move the candidate far from the base by design
    min_diversity_ratio=0.3,
    eval_prompts=2,
    samples_per_prompt=2,
    sample_max_tokens=8,
)


def test_gate_accepts_a_good_candidate_and_rejects_a_bad_one(setup) -> None:  # type: ignore[no-untyped-def]
    model_dir, tok = setup
    heldout = [tokenize_pair(tok, p, 48, 24) for p in toy_pairs(4, offset=8)]  # prompts never trained on
    kw = dict(beta=0.1, reference="base", seed=0, device=CPU, dtype=CPU_DT)
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
    model = build_policy(load_base_model(model_dir, CPU, CPU_DT), tiny_dpo())
    prompt = tuple(tokenize_pair(tok, toy_pairs(1)[0], 48, 24).prompt_ids)
    kw = dict(mode="base", n=2, max_new_tokens=6, temperature=1.0, device=CPU, dtype=CPU_DT)
    a = sample_completions(model, tok, [prompt], seed=1, **kw)
    b = sample_completions(model, tok, [prompt], seed=1, **kw)
    assert a == b and len(a) == 2
    for p, c in a:
        assert p == prompt and 1 <= len(c) <= 6
        assert tok.eos_token_id not in c[:-1]


def test_sanity_checks_on_constructed_samples() -> None:
    fluent = ["The weather is mild today, so a walk in the park sounds good.", "I think it will rain later."]
    emoji = ["\U0001f600\U0001f600!!! \U0001f389\U0001f389\U0001f389", "wow \U0001f525\U0001f525\U0001f525"]
    assert non_language_share(fluent) == 0.0
    assert non_language_share(emoji) > 0.5
    assert empty_share(["", "  ", "hi", "ok"]) == 0.5 and empty_share([]) == 0.0
    assert repetition_share([[1, 2, 3, 4, 5, 6]]) == 0.0
    assert repetition_share([[7] * 10]) == pytest.approx(7 / 8)  # every 3-gram after the first repeats
    assert repetition_share([[1, 2, 3], [1, 2, 3]]) == 0.0  # across replies is distinct-n's job
    assert cutoff_share([[1, 2, 0], [1, 2], []], eos_id=0) == pytest.approx(2 / 3)
    assert nll_per_token(torch.tensor([-3.0, -1.0]), [2, 2]) == pytest.approx(1.0)
    s = sanity([[5] * 8], ["a a a a"], eos_id=0)
    assert s.repetition > 0.5 and s.cutoff == 1.0 and s.empty == 0.0


def test_decide_names_each_failed_fluency_check() -> None:
    cfg = GateConfig()
    ok = metrics(nll_per_token=2.4, reference_nll_per_token=2.23, non_language=0.01, reference_non_language=0.0)
    assert decide(ok, cfg).passed
    # The degenerate candidate: 3.15 vs 2.23 nats/token under the base, emoji-heavy, looping.
    bad = metrics(
        nll_per_token=3.15, reference_nll_per_token=2.23, non_language=0.4, reference_non_language=0.02,
        repetition=0.5, reference_repetition=0.05, empty=0.3, reference_empty=0.0, cutoff=1.0, reference_cutoff=0.5,
    )  # fmt: skip
    r = decide(bad, cfg)
    assert r.failed_checks == ["nll", "repetition", "non_language", "empty", "cutoff"]
    assert "+0.920 > max_nll_increase_per_token 0.500" in r.failures[0]
    assert r.to_dict()["failed_checks"] == r.failed_checks
    assert not decide(metrics(nll_per_token=float("nan")), cfg).passed


def test_a_degenerate_adapter_is_rejected_by_the_default_gate_with_its_reasons_named(setup) -> None:  # type: ignore[no-untyped-def]
    """An adapter trained to answer everything with one token repeated: held-out accuracy is what
    it was trained for, so the fluency check (and the KL bound) stand between it and users."""
    model_dir, tok = setup
    cfg = tiny_dpo(epochs=8, batch_size=4, learning_rate=1e-2)
    model = build_policy(load_base_model(model_dir, CPU, CPU_DT), cfg)
    kw = dict(pad_id=tok.pad_token_id, device=CPU, dtype=CPU_DT)
    degenerate = [replace(p, chosen_text="!" * 24, rejected_text=p.chosen_text) for p in toy_pairs(12)]
    train, heldout = degenerate[:8], degenerate[8:]
    items = [tokenize_pair(tok, p, 48, 24) for p in train]
    train_dpo(model, items, *score_pairs(model, items, mode="base", **kw), cfg, progress=False, **kw)

    # The shipped thresholds; only the sample budget is small.
    gate = GateConfig(eval_prompts=4, samples_per_prompt=2, sample_max_tokens=16)
    held = [tokenize_pair(tok, p, 48, 24) for p in heldout]
    m = evaluate_candidate(model, tok, held, gate, beta=cfg.beta, reference="base", seed=0, device=CPU, dtype=CPU_DT)
    verdict = decide(m, gate)
    assert m.accuracy == 1.0  # it learned exactly what it was given
    assert not verdict.passed
    assert {"nll", "kl"} <= set(verdict.failed_checks), verdict.failures
    nll = verdict.failures[verdict.failed_checks.index("nll")]
    assert "max_nll_increase_per_token" in nll and m.nll_increase_per_token > gate.max_nll_increase_per_token
