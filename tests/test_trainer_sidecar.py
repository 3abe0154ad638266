"""Rounds and the sidecar on the real model and the real store: skip with a reason, refuse a
foreign base model, publish once per batch of feedback, and recover from a crash mid-round."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from trainer_fixtures import BAD, GOOD, QUESTIONS, ListSource, chat_prompt, tiny_config, toy_rows

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import SidecarConfig, TrainerConfig
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.runner import run_round
from tuneloop.trainer.sidecar import Sidecar, should_run


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from tuneloop.server.model_cache import ensure_default_model

    return ensure_default_model()


def sample(metrics: TrainerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_trigger_rule() -> None:
    cfg = SidecarConfig(min_new_pairs=10, interval_minutes=5, min_new_pairs_periodic=3)
    assert should_run(10, 1.0, cfg)[0]
    assert not should_run(9, 60.0, cfg)[0]  # not due yet
    assert should_run(3, 301.0, cfg)[0]
    assert not should_run(2, 301.0, cfg)[0]
    assert not should_run(3, 10.0, cfg)[0]  # a fresh sidecar waits T minutes (or N pairs) for its first round


def test_too_few_pairs_is_a_skip_with_a_reason(tmp_path: Path, model_dir: Path) -> None:
    cfg = tiny_config(str(tmp_path / "reg"), str(model_dir), min_train_pairs=50)
    metrics = TrainerMetrics(CollectorRegistry())
    result = run_round(cfg, ListSource(*toy_rows(QUESTIONS[:6])), AdapterRegistry(tmp_path / "reg"), metrics=metrics)
    assert result.outcome == "skipped" and "too few usable pairs" in result.reason and "need 50" in result.reason
    assert sample(metrics, "tuneloop_trainer_runs_total", outcome="skipped") == 1.0
    assert AdapterRegistry(tmp_path / "reg").names() == []


def test_a_served_adapter_on_another_base_model_is_refused(tmp_path: Path, model_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    adapter = tmp_path / "foreign"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    reg.publish("toy", adapter, {"base_model": "OtherModel-7B@0123456789abcdef"})
    metrics = TrainerMetrics(CollectorRegistry())
    result = run_round(
        tiny_config(str(reg.root), str(model_dir)), ListSource(*toy_rows(QUESTIONS)), reg, metrics=metrics
    )
    assert result.outcome == "refused" and "OtherModel-7B" in result.reason and "--model-dir" in result.reason
    assert [v.version for v in reg.versions("toy")] == ["v1"]


async def test_sidecar_publishes_once_for_one_batch_of_feedback(tmp_path: Path, model_dir: Path) -> None:
    from completion_factory import make_completion

    from tuneloop.server.feedback import FeedbackEvent
    from tuneloop.server.feedback.service import FeedbackService
    from tuneloop.server.metrics import Metrics
    from tuneloop.server.store import open_store
    from tuneloop.trainer.source import StoreSource

    store = open_store(f"sqlite:///{tmp_path}/store.db")
    service = FeedbackService(store, Metrics(CollectorRegistry()))
    service.start()
    for i, q in enumerate(QUESTIONS):
        good = make_completion(chat_prompt(q), GOOD)
        bad = make_completion(chat_prompt(q), BAD)
        store.write_completions([good, bad])
        # Alternate the order so "second" choices are exercised too.
        first, second, choice = (good, bad, "first") if i % 2 else (bad, good, "second")
        await service.submit(FeedbackEvent(
            rater_id=f"rater{i % 4}", kind="pairwise", completion_id=first.completion_id,
            second_completion_id=second.completion_id, choice=choice,
        ))  # fmt: skip
        await service.submit(
            FeedbackEvent(rater_id="x", kind="thumbs", completion_id=bad.completion_id, thumb_up=False)
        )
    await service.close()

    reg = AdapterRegistry(tmp_path / "reg")
    assert TrainerConfig().publish == "canary"  # the default this test exercises
    cfg = tiny_config(str(reg.root), str(model_dir), publish="canary", canary_share=0.2)
    cfg.sidecar = SidecarConfig(min_new_pairs=8, min_new_pairs_periodic=4, interval_minutes=60, metrics_port=0)
    metrics = TrainerMetrics(CollectorRegistry())
    source = StoreSource(store)
    completions, feedback = source.load()
    assert len(completions) == 24 and {f.kind for f in feedback} == {"pairwise", "thumbs"}
    assert all(f.choice and f.choice.startswith("cmpl") for f in feedback if f.kind == "pairwise")

    sidecar = Sidecar(cfg, source, reg, metrics)
    first = sidecar.tick()
    assert first is not None and first.outcome == "published" and first.routed == "canary at 20%", first
    canary = reg.canary("toy")
    assert canary is not None and (canary.version, canary.share, canary.auto_decide) == ("v1", 0.2, True)
    assert reg.channel("toy") is None  # it earns `current` from live feedback; the server decides
    assert sidecar.tick() is None  # the same feedback: nothing new
    assert Sidecar(cfg, source, reg, TrainerMetrics(CollectorRegistry())).tick() is None  # nor after a restart
    versions = reg.versions("toy")
    assert [v.version for v in versions] == ["v1"]
    manifest = versions[0].manifest
    assert set(manifest["data_snapshot"]["event_ids"]) == {f.event_id for f in feedback if f.kind == "pairwise"}
    assert manifest["algorithm"] == "dpo" and manifest["parent_version"] is None
    assert manifest["base_model"].startswith(model_dir.name + "@")
    assert {"accuracy", "kl", "distinct_1", "distinct_2", "first_loss", "last_loss"} <= manifest["metrics"].keys()
    assert manifest["gate"]["passed"] and manifest["publish"] == {"mode": "canary", "canary_share": 0.2}
    assert sample(metrics, "tuneloop_trainer_runs_total", outcome=first.outcome) == 1.0
    assert sample(metrics, "tuneloop_trainer_examples") == first.train_pairs
    assert sample(metrics, "tuneloop_trainer_run_duration_seconds_count") == 1.0
    assert sample(metrics, "tuneloop_trainer_last_loss") == pytest.approx(first.metrics["last_loss"])
    store.close()


_KILL_MID_TRAINING = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from trainer_fixtures import QUESTIONS, ListSource, tiny_config, toy_rows
    from tuneloop.server.registry import AdapterRegistry
    from tuneloop.trainer import dpo, runner

    real = dpo.dpo_step
    def step_then_die(*a, **k):
        real(*a, **k)
        os._exit(9)  # killed after the first optimizer step
    dpo.dpo_step = step_then_die
    cfg = tiny_config(sys.argv[1], sys.argv[2])
    runner.run_round(cfg, ListSource(*toy_rows(QUESTIONS)), AdapterRegistry(sys.argv[1]))
    """
)


def test_a_round_killed_mid_training_publishes_nothing_and_restarts_cleanly(tmp_path: Path, model_dir: Path) -> None:
    reg_dir = tmp_path / "reg"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_TRAINING, str(reg_dir), str(model_dir), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 9, proc.stderr[-2000:]
    reg = AdapterRegistry(reg_dir)
    assert reg.versions("toy") == [] and reg.channel("toy") is None
    result = run_round(tiny_config(str(reg_dir), str(model_dir)), ListSource(*toy_rows(QUESTIONS)), reg)
    assert result.outcome == "published" and result.version == "v1" and reg.channel("toy") == "v1"


def test_a_crash_before_the_channel_moved_is_finished_not_republished(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = tiny_config(str(reg.root), str(model_dir))
    source = ListSource(*toy_rows(QUESTIONS))

    def crash(*_a: object) -> None:
        raise SystemExit("killed before the channel moved")

    monkeypatch.setattr(AdapterRegistry, "_move_channel", crash)
    with pytest.raises(SystemExit):
        run_round(cfg, source, reg)
    monkeypatch.undo()
    assert [v.version for v in reg.versions("toy")] == ["v1"] and reg.channel("toy") is None
    assert reg.get("toy", "v1").status == "accepted"
    again = run_round(cfg, source, reg)
    assert again.outcome == "duplicate" and "finishing an interrupted publish" in again.reason
    assert [v.version for v in reg.versions("toy")] == ["v1"] and reg.channel("toy") == "v1"


def test_a_pending_canary_holds_the_next_round_and_a_crash_before_it_started_is_finished(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = tiny_config(str(reg.root), str(model_dir), publish="canary")
    cfg.sidecar = SidecarConfig(min_new_pairs=4, min_new_pairs_periodic=4, interval_minutes=60, metrics_port=0)
    source = ListSource(*toy_rows(QUESTIONS))

    def crash(*_a: object, **_k: object) -> None:
        raise SystemExit("killed before the canary started")

    monkeypatch.setattr(AdapterRegistry, "start_canary", crash)
    with pytest.raises(SystemExit):
        run_round(cfg, source, reg)
    monkeypatch.undo()
    assert reg.get("toy", "v1").status == "accepted" and reg.canary("toy") is None
    again = run_round(cfg, source, reg)
    assert again.outcome == "duplicate" and "started its canary" in again.reason
    assert reg.canary("toy") is not None and reg.canary("toy").version == "v1"  # type: ignore[union-attr]

    # New feedback arrives while v1 is on trial: the sidecar waits for the verdict.
    more = toy_rows(QUESTIONS, tag="n", rater_prefix="n")
    source.completions += more[0]
    source.feedback += more[1]
    sidecar = Sidecar(cfg, source, reg, TrainerMetrics(CollectorRegistry()))
    assert sidecar.tick() is None and [v.version for v in reg.versions("toy")] == ["v1"]
    reg.end_canary("toy", "rolled_back", expected="v1", detail="worse than base")
    # A rolled-back canary is never restarted by a retry of its round.
    assert run_round(cfg, ListSource(*toy_rows(QUESTIONS)), reg).outcome == "duplicate"
    assert reg.canary("toy") is None
    assert [e["event"] for e in reg.canary_log("toy")] == ["started", "rolled_back"]
