"""`--algo auto`: the rule on constructed feedback mixes, and a round and the sidecar that follow it
(training replaced by a stub: what is tested is which algorithm runs on which data, and the record)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from trainer_fixtures import BAD, GOOD, QUESTIONS, ListSource, chat_prompt, toy_rows

from tuneloop.server.errors import InvalidArgument
from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer import sidecar as sidecar_module
from tuneloop.trainer.algos import ALGORITHMS, Candidate, RoundInputs
from tuneloop.trainer.choose import FeedbackCounts, choose_algorithm, feedback_counts
from tuneloop.trainer.config import AutoConfig, DatasetConfig, SidecarConfig, TrainerConfig
from tuneloop.trainer.dataset import build_dataset, build_pointwise
from tuneloop.trainer.gate import GateResult
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.rows import RATING, THUMBS, CompletionRow, FeedbackRow
from tuneloop.trainer.runner import run_round
from tuneloop.trainer.sidecar import Sidecar


def questions(n: int) -> list[str]:
    return [f"{q} ({i})" for i in range(n // len(QUESTIONS) + 1) for q in QUESTIONS][:n]


def single_replies(n: int, tag: str) -> list[CompletionRow]:
    """One reply to each of n prompts: nothing to pair it with."""
    return [CompletionRow(f"{tag}{i}", chat_prompt(q), GOOD if i % 2 else BAD) for i, q in enumerate(questions(n))]


def thumbs(comps: list[CompletionRow]) -> list[FeedbackRow]:
    return [FeedbackRow(f"t-{c.completion_id}", THUMBS, f"u{i % 7}", c.completion_id, value=1.0 if c.text == GOOD
                        else -1.0, created_at=float(i)) for i, c in enumerate(comps)]  # fmt: skip


def ratings(comps: list[CompletionRow], values: list[float]) -> list[FeedbackRow]:
    return [FeedbackRow(f"s-{c.completion_id}", RATING, f"v{i % 7}", c.completion_id, value=values[i % len(values)],
                        created_at=float(i)) for i, c in enumerate(comps)]  # fmt: skip


def counts_of(
    comps: list[CompletionRow], feedback: list[FeedbackRow], ratings_as_labels: bool = True
) -> FeedbackCounts:
    cfg = DatasetConfig(max_pairs_per_rater=10_000)
    return feedback_counts(
        build_dataset(comps, feedback, cfg), build_pointwise(comps, feedback, cfg), ratings_as_labels
    )


SMALL = AutoConfig(auto_ppo_min_ratings=20)


def test_mostly_pairwise_choices_pick_dpo() -> None:
    comps, feedback = toy_rows(QUESTIONS)  # 12 choices
    extra = single_replies(4, "x")
    counts = counts_of(comps + extra, feedback + thumbs(extra))
    assert (counts.pairs, counts.unpaired, counts.choices, counts.thumbs) == (12, 4, 12, 4)
    algo, why = choose_algorithm(counts, SMALL)
    assert algo == "dpo" and "12 pairs and 4 unpaired" in why and "75%" in why


def test_mostly_unpaired_thumbs_pick_kto() -> None:
    comps, feedback = toy_rows(QUESTIONS[:3])
    extra = single_replies(20, "x")
    counts = counts_of(comps + extra, feedback + thumbs(extra))
    assert (counts.pairs, counts.unpaired) == (3, 20)
    assert choose_algorithm(counts, SMALL)[0] == "kto"
    # The threshold is a setting: the same mix goes to DPO when a tenth of pairs is enough.
    assert choose_algorithm(counts, AutoConfig(auto_min_pair_share=0.1))[0] == "dpo"


def test_thumbs_up_and_down_on_one_prompt_are_pairs_not_unpaired() -> None:
    comps, _ = toy_rows(QUESTIONS)  # a friendly and a curt reply per prompt
    counts = counts_of(comps, thumbs(comps))
    assert (counts.pairs, counts.unpaired, counts.thumbs) == (12, 0, 24)
    assert choose_algorithm(counts, SMALL)[0] == "dpo"


def test_many_varied_ratings_pick_ppo_and_uniform_ones_do_not() -> None:
    rated = single_replies(30, "r")
    varied = counts_of(rated, ratings(rated, [1, 2, 3, 4, 5]))
    assert (varied.ratings, varied.rating_values, varied.pairs) == (30, 5, 0)
    algo, why = choose_algorithm(varied, SMALL)
    assert algo == "ppo" and "30 ratings with 5 distinct values" in why
    assert choose_algorithm(varied, AutoConfig())[0] != "ppo"  # 30 is short of the default 256
    # All fives: nothing for a reward model to grade; as unpaired desirable labels they go to KTO.
    uniform = counts_of(rated, ratings(rated, [5]))
    assert uniform.rating_values == 1 and choose_algorithm(uniform, SMALL)[0] == "kto"
    # Varied ratings that are a minority of the judgements: not PPO.
    thumbed = single_replies(40, "t")
    assert choose_algorithm(counts_of(rated + thumbed, ratings(rated, [1, 3, 5]) + thumbs(thumbed)), SMALL)[0] == "kto"


def test_no_feedback_and_unlabelled_ratings_fall_back_to_dpo() -> None:
    assert choose_algorithm(FeedbackCounts(0, 0, 0, 0, 0, 0)) == ("dpo", "no usable feedback yet")
    rated = single_replies(5, "m")
    middle = counts_of(rated, ratings(rated, [3]))
    assert middle.unpaired == 0 and choose_algorithm(middle, SMALL)[0] == "dpo"
    fives = counts_of(rated, ratings(rated, [5]), ratings_as_labels=False)
    assert fives.unpaired == 0 and choose_algorithm(fives, SMALL)[0] == "dpo"


def test_auto_config_validation() -> None:
    with pytest.raises(InvalidArgument, match="auto_min_pair_share"):
        AutoConfig(auto_min_pair_share=1.5)
    with pytest.raises(InvalidArgument, match="auto_ppo_min_rating_values"):
        AutoConfig(auto_ppo_min_rating_values=6)


# -- a round and the sidecar follow the rule --------------------------------------------------------
@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def stub_training(monkeypatch: pytest.MonkeyPatch) -> list[RoundInputs]:
    """Every policy algorithm "trains" by writing placeholder adapter files, and passes its gate."""
    seen: list[RoundInputs] = []

    def train(inputs: RoundInputs) -> Candidate:
        seen.append(inputs)

        def save(out: Path) -> None:
            (out / "adapter_config.json").write_text(json.dumps({"r": 8}))
            (out / "adapter_model.safetensors").write_bytes(b"w")

        return Candidate(verdict=GateResult(passed=True), metrics={}, save=save)

    for name in ("dpo", "kto", "ppo"):
        monkeypatch.setattr(ALGORITHMS[name], "train", train)
    return seen


def auto_config(tmp_path: Path, model_dir: Path, **kw: Any) -> TrainerConfig:
    return TrainerConfig(
        algo="auto", adapter="toy", model_dir=str(model_dir), registry_dir=str(tmp_path / "reg"), min_train_pairs=4,
        min_heldout_pairs=2, progress=False, publish="current", data=DatasetConfig(heldout_fraction=0.34), **kw,
    )  # fmt: skip


def test_an_auto_round_runs_kto_on_thumbs_and_records_the_choice(
    tmp_path: Path, fake_model_dir: Path, stub_training: list[RoundInputs]
) -> None:
    extra = single_replies(16, "x")
    reg = AdapterRegistry(tmp_path / "reg")
    result = run_round(auto_config(tmp_path, fake_model_dir), ListSource(extra, thumbs(extra)), reg)
    assert result.outcome == "published" and result.algorithm == "kto", result.summary()
    (inputs,) = stub_training
    assert inputs.cfg.algo == "kto" and inputs.dataset.pairs == [] and inputs.pointwise is not None
    assert len(inputs.pointwise.examples) == 16
    manifest = reg.get("toy", "v1").manifest
    assert manifest["algorithm"] == "kto" and set(manifest["hyperparameters"]) == {"kto", "policy"}
    choice = manifest["algorithm_choice"]
    assert (choice["rule"], choice["picked"]) == ("auto", "kto") and "0 pairs and 16 unpaired" in choice["reason"]
    assert choice["counts"]["thumbs"] == 16


def test_an_auto_round_with_nothing_to_train_on_skips(tmp_path: Path, fake_model_dir: Path) -> None:
    result = run_round(auto_config(tmp_path, fake_model_dir), ListSource([], []), AdapterRegistry(tmp_path / "reg"))
    assert result.outcome == "skipped" and result.algorithm == "dpo" and "too few usable pairs" in result.reason


def test_the_sidecar_picks_per_round_and_logs_why(
    tmp_path: Path, fake_model_dir: Path, stub_training: list[RoundInputs], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = auto_config(
        tmp_path, fake_model_dir, sidecar=SidecarConfig(min_new_pairs=8, min_new_pairs_periodic=4, metrics_port=0)
    )
    extra = single_replies(10, "x")
    source = ListSource(extra, thumbs(extra))
    reg = AdapterRegistry(tmp_path / "reg")
    sidecar = Sidecar(cfg, source, reg, TrainerMetrics(CollectorRegistry()))
    with caplog.at_level(logging.INFO, logger=sidecar_module.__name__):
        first = sidecar.tick()
    assert first is not None and first.outcome == "published" and first.algorithm == "kto"
    assert "--algo auto picked kto: 0 pairs and 10 unpaired" in caplog.text
    assert sidecar.tick() is None  # the same thumbs are not new
    # Then users start choosing between replies (12 pairs against the 10 thumbs): the next round is
    # DPO, and its pairs are new to it.
    comps, choices = toy_rows(QUESTIONS, tag="p")
    source.completions += comps
    source.feedback += choices
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=sidecar_module.__name__):
        second = sidecar.tick()
    assert second is not None and second.algorithm == "dpo" and "--algo auto picked dpo" in caplog.text
    assert [i.cfg.algo for i in stub_training] == ["kto", "dpo"] and stub_training[1].pointwise is None
    assert reg.get("toy", "v2").manifest["algorithm_choice"]["picked"] == "dpo"
