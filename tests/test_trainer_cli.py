"""`tuneloop trainer once` and `tuneloop adapters list|show`, the config file, and the metrics endpoint."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tuneloop.cli.main import main
from tuneloop.cli.trainer import build_parser, config_from_args
from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.metrics import TrainerMetrics


def publish(reg: AdapterRegistry, tmp: Path, accepted: bool = True, **manifest: object) -> str:
    d = tmp / "src"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"w")
    full = {"base_model": "m@1", "algorithm": "dpo", "metrics": {"accuracy": 0.75, "kl": 1.5},
            "data_snapshot": {"event_ids": ["e1", "e2"], "pairs": {"train": [], "heldout": []}, "train_pairs": 2},
            **manifest}  # fmt: skip
    return reg.publish("support", d, full, accepted=accepted).version


def test_once_on_an_empty_store_skips_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([
        "trainer", "once", "--algo", "dpo", "--store-url", f"sqlite:///{tmp_path}/s.db",
        "--registry-dir", str(tmp_path / "reg"), "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "outcome=skipped" in out and "too few usable pairs" in out


@pytest.mark.parametrize(
    ("algo", "unit", "picked"), [("kto", "pairs, thumbs and ratings", "kto"), ("auto", "pairs", "dpo")]
)
def test_once_with_kto_and_auto_on_an_empty_store_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: str, unit: str, picked: str
) -> None:
    code = main([
        "trainer", "once", "--algo", algo, "--store-url", f"sqlite:///{tmp_path}/s.db",
        "--registry-dir", str(tmp_path / "reg"), "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "outcome=skipped" in out and f"algo={picked}" in out and f"too few usable {unit}" in out


def test_kto_and_auto_settings_from_flags_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("[kto]\nkto_beta = 0.3\n[auto]\nauto_ppo_min_ratings = 50\n")
    args = build_parser().parse_args(
        ["once", "--config", str(toml), "--algo", "auto", "--no-kto-ratings-as-labels", "--auto-min-pair-share",
         "0.7", "--kto-undesirable-weight", "2"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.algo == "auto" and cfg.kto.kto_beta == 0.3 and cfg.kto.kto_ratings_as_labels is False
    assert cfg.kto.kto_undesirable_weight == 2.0 and cfg.kto.kto_balance_classes is True
    assert cfg.auto.auto_ppo_min_ratings == 50 and cfg.auto.auto_min_pair_share == 0.7


def test_the_store_comes_from_the_flag_else_the_servers_variable_else_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    monkeypatch.delenv("TUNELOOP_STORE_URL", raising=False)
    default = config_from_args(build_parser().parse_args(["once"])).resolved_store_url()
    assert default == f"sqlite:///{(tmp_path / 'tuneloop.db').resolve()}"
    shared = "postgresql+psycopg://tuneloop:secret@db:5432/tuneloop"
    monkeypatch.setenv("TUNELOOP_STORE_URL", shared)
    assert config_from_args(build_parser().parse_args(["once"])).resolved_store_url() == shared
    flag = f"sqlite:///{tmp_path}/other.db"
    assert config_from_args(build_parser().parse_args(["once", "--store-url", flag])).resolved_store_url() == flag


def test_bad_settings_exit_2_with_the_setting_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trainer", "once", "--beta", "-1", "--store-url", f"sqlite:///{tmp_path}/s.db"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    assert main(["trainer", "once", "--algo", "a2c"]) == 2
    assert "algo must be one of" in capsys.readouterr().err


def test_flags_and_toml_config_fill_every_section(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text(
        'adapter = "support"\n[dpo]\nbeta = 0.3\nlora_r = 4\n[gate]\nmax_kl_per_token = 2.5\n'
        "[sidecar]\nmin_new_pairs = 90\n"
    )
    args = build_parser().parse_args(
        ["run", "--config", str(toml), "--beta", "0.2", "--lora-targets", "q_proj", "v_proj", "--no-use-thumbs"]
    )
    cfg = config_from_args(args)
    assert cfg.adapter == "support" and cfg.dpo.beta == 0.2 and cfg.dpo.lora_r == 4
    assert cfg.dpo.lora_targets == ["q_proj", "v_proj"] and cfg.data.use_thumbs is False
    assert cfg.gate.max_kl_per_token == 2.5 and cfg.sidecar.min_new_pairs == 90 and cfg.sidecar.metrics_port == 9401


def test_adapters_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    publish(reg, tmp_path)
    publish(reg, tmp_path, accepted=False, parent_version="v1", metrics={"accuracy": 0.4, "kl": 9.0})
    (tmp_path / "reg/support/versions/v3").mkdir()  # corrupt: nothing in it
    root = ["--registry-dir", str(reg.root)]
    assert main(["adapters", *root, "list"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == "NAME VERSION STATUS PARENT ALGO PAIRS ACCURACY KL/TOKEN CREATED".split()
    assert lines[1].split()[:4] == ["support", "v1", "*", "accepted"]
    assert lines[2].split()[:4] == ["support", "v2", "rejected", "v1"]
    assert "v3 is corrupt" in captured.err
    assert main(["adapters", "list", *root, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["current"], r["accuracy"]) for r in rows] == [("v1", True, 0.75), ("v2", False, 0.4)]
    assert main(["adapters", *root, "show", "support"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v1" and shown["rank"] == 8 and shown["data_snapshot"]["event_count"] == 2
    assert "event_ids" not in shown["data_snapshot"]
    assert main(["adapters", *root, "show", "support", "v2", "--full"]) == 0
    assert json.loads(capsys.readouterr().out)["data_snapshot"]["event_ids"] == ["e1", "e2"]
    assert main(["adapters", *root, "show", "support", "v9"]) == 1
    assert "no version v9" in capsys.readouterr().err


def test_metrics_endpoint_serves_every_trainer_metric() -> None:
    metrics = TrainerMetrics(CollectorRegistry())
    metrics.run_finished("published", 12.0)
    metrics.last_loss.set(0.25)
    port = metrics.serve(0, "127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        'tuneloop_trainer_runs_total{outcome="published"} 1.0', 'tuneloop_trainer_runs_total{outcome="failed"} 0.0',
        "tuneloop_trainer_run_duration_seconds_count 1.0", "tuneloop_trainer_last_loss 0.25",
        "tuneloop_trainer_heldout_accuracy", "tuneloop_trainer_kl_per_token", "tuneloop_trainer_examples",
        "tuneloop_trainer_last_success_timestamp_seconds",
    ):  # fmt: skip
        assert name in body
