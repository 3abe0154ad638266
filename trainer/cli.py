"""`tuneloop trainer run|once` and `tuneloop adapters list|show`.

Flags are generated from the config dataclasses (one flat flag per field, its help text from the
field); `--config FILE` reads a TOML file with top-level keys and [data] / [dpo] / [gate] /
[sidecar] tables first, and flags win over it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import tomllib
import typing
from collections.abc import Sequence
from typing import Any

from tuneloop.server.config import is_loopback_host
from tuneloop.server.errors import FailedPrecondition, InvalidArgument, TuneloopError
from tuneloop.server.registry import DEFAULT_CHANNEL, REWARD, AdapterRegistry, Registry, base_model_fingerprint
from tuneloop.server.settings import add_flags

from .config import SECTIONS, TrainerConfig, leaf_fields

log = logging.getLogger("tuneloop.trainer")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrainerConfig)
    return {name: hints[name] for name in SECTIONS}


def _add_fields(parser: argparse.ArgumentParser, cls: type, dest_prefix: str) -> None:
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__)
    add_flags(group, cls, leaf_fields(cls), dest_prefix)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneloop trainer", description="Train LoRA adapters from user feedback.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("once", "Run one round: build the dataset, train, gate, publish."),
        ("run", "Run the sidecar: start a round whenever enough new feedback arrived."),
    ):
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", help="TOML file with any of the settings (flags win).")
        p.add_argument("--log-level", default="INFO", help="Log level.")
        _add_fields(p, TrainerConfig, "")
        for section, cls in _sections().items():
            _add_fields(p, cls, section + ".")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainerConfig:
    values: dict[str, Any] = {s: {} for s in SECTIONS}
    if args.config:
        with open(args.config, "rb") as fh:
            data = tomllib.load(fh)
        for k, v in data.items():
            if k in SECTIONS and isinstance(v, dict):
                values[k].update(v)
            else:
                values[k] = v
    for dest, v in vars(args).items():
        if dest in ("command", "config", "log_level"):
            continue
        section, _, name = dest.rpartition(".")
        if section:
            values[section][name] = v
        else:
            values[name] = v
    sections = _sections()
    try:
        built = {s: sections[s](**values.pop(s)) for s in SECTIONS}
        return TrainerConfig(**values, **built)
    except TypeError as exc:  # an unknown key in the TOML file
        raise TuneloopError(f"bad trainer config: {exc}") from exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """`tuneloop trainer once|run ...` (a leading "trainer" is accepted and dropped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trainer"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        cfg = config_from_args(args)
    except (TuneloopError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"tuneloop trainer: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - torch-heavy imports after parsing

    from .metrics import TrainerMetrics  # noqa: PLC0415
    from .runner import run_round  # noqa: PLC0415
    from .source import StoreSource  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # our own bar shows the steps; weight loading needs none
    registry = AdapterRegistry(cfg.registry_dir)
    source = StoreSource.open(cfg.resolved_store_url())
    metrics = TrainerMetrics()
    try:
        if args.command == "once":
            result = run_round(cfg, source, registry, metrics=metrics)
            print(result.summary())
            return 1 if result.outcome in ("failed", "refused") else 0
        return _run_sidecar(cfg, source, registry, metrics)
    finally:
        source.close()


def _run_sidecar(cfg: TrainerConfig, source: Any, registry: Registry, metrics: Any) -> int:
    from .sidecar import Sidecar  # noqa: PLC0415

    if cfg.sidecar.metrics_port:
        port = metrics.serve(cfg.sidecar.metrics_port, cfg.sidecar.metrics_host)
        log.info("trainer metrics on http://%s:%d/metrics", cfg.sidecar.metrics_host, port)
        if not is_loopback_host(cfg.sidecar.metrics_host):
            log.warning(
                "trainer metrics bind %s: reachable beyond this machine (set --metrics-host 127.0.0.1 to keep "
                "them local)",
                cfg.sidecar.metrics_host,
            )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "trainer sidecar for adapter %s: a round at %d new pairs, or every %.0f min with %d",
        cfg.adapter,
        cfg.sidecar.min_new_pairs,
        cfg.sidecar.interval_minutes,
        cfg.sidecar.min_new_pairs_periodic,
    )
    Sidecar(cfg, source, registry, metrics).run(stop)
    return 0


# -- adapters ---------------------------------------------------------------------------------
def _adapters_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneloop adapters", description="Read the adapter registry.")
    parser.add_argument("--registry-dir", default="", help="Registry directory (default $TUNELOOP_HOME/adapters).")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="List adapter versions with their status and gate metrics.")
    ls.add_argument("name", nargs="?", default="", help="Only this adapter.")
    ls.add_argument("--json", action="store_true", help="One JSON object per version.")
    show = sub.add_parser("show", help="Print one version's manifest (default: the current one).")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="")
    show.add_argument("--full", action="store_true", help="Include the per-pair data snapshot.")
    for p in (ls, show):
        p.add_argument("--registry-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def adapters_main(argv: Sequence[str] | None = None) -> int:
    """`tuneloop adapters list|show ...` (a leading "adapters" is accepted and dropped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["adapters"]:
        argv = argv[1:]
    args = _adapters_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    registry = AdapterRegistry(args.registry_dir)
    try:
        if args.command == "list":
            return _list(registry, args.name, args.json)
        return _show(registry, args.name, args.version, args.full)
    except TuneloopError as exc:
        print(f"tuneloop adapters: {exc}", file=sys.stderr)
        return 1


def _list(registry: Registry, only: str, as_json: bool) -> int:
    names = [only] if only else registry.names()
    rows = []
    for name in names:
        current = registry.channel(name, DEFAULT_CHANNEL)
        canary = registry.canary(name)
        for v in registry.versions(name):
            m = v.manifest.get("metrics", {})
            rows.append({
                "name": name, "version": v.version, "current": v.version == current,
                "canary_share": canary.share if canary and canary.version == v.version else None, "status": v.status,
                "parent": v.parent_version, "algorithm": v.manifest.get("algorithm"),
                "created_at": v.manifest.get("created_at"), "accuracy": m.get("accuracy"),
                "kl_per_token": m.get("kl_per_token"),
                "pairs": v.manifest.get("data_snapshot", {}).get("train_pairs"),
            })  # fmt: skip
        for version, reason in registry.corrupt_versions(name):
            print(f"warning: {name}/{version} is corrupt and skipped: {reason}", file=sys.stderr)
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no adapter versions in {registry.root}")
        return 0
    header = ("NAME", "VERSION", "STATUS", "PARENT", "ALGO", "PAIRS", "ACCURACY", "KL/TOKEN", "CREATED")
    table = [header] + [
        (
            r["name"],
            r["version"] + (" *" if r["current"] else f" ~{r['canary_share']:.0%}" if r["canary_share"] else ""),
            r["status"],
            _fmt(r["parent"]),
            _fmt(r["algorithm"]),
            _fmt(r["pairs"]),
            _fmt(r["accuracy"]),
            _fmt(r["kl_per_token"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])) if r["created_at"] else "-",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print("(* = current, ~N% = canary on N% of default traffic)")
    return 0


def _show(registry: Registry, name: str, version: str, full: bool) -> int:
    v = registry.resolve(name, version)
    manifest = dict(v.manifest)
    snap = manifest.get("data_snapshot")
    if isinstance(snap, dict) and not full:
        snap = dict(snap)
        n_events = len(snap.pop("event_ids", []))
        snap.pop("pairs", None)
        snap["event_count"] = n_events
        manifest["data_snapshot"] = snap
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict) and not full:
        manifest["metrics"] = {k: val for k, val in metrics.items() if k != "loss_curve"}
    extra = {"report": str(v.path / "report.md")} if (v.path / "report.md").is_file() else {}
    out = {"path": str(v.path), "rank": v.rank, "kind": v.kind, **manifest, **extra}
    print(json.dumps(out, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- reward ---------------------------------------------------------------------------------
def _reward_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneloop reward", description="Use a published reward model (trained with `--algo reward`)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser(
        "score",
        help="Score replies to a prompt: the raw reward, its z-score on the training data's scale, the "
        "chance of a thumbs up, and the most likely rating.",
    )
    score.add_argument("--prompt", required=True, help="The user's message (the chat template is applied).")
    score.add_argument(
        "--completion", action="append", required=True, help="A reply to score (repeat to compare several)."
    )
    score.add_argument("--adapter", default="default", help="Policy adapter whose reward model to use.")
    score.add_argument("--version", default="", help="Reward model version (default: its current one).")
    score.add_argument("--registry-dir", default="", help="Registry directory (default $TUNELOOP_HOME/adapters).")
    score.add_argument("--model-dir", default="", help="Base model directory (default: the built-in SmolLM2).")
    score.add_argument("--json", action="store_true", help="One JSON object per reply.")
    return parser


def reward_main(argv: Sequence[str] | None = None) -> int:
    """`tuneloop reward score ...` (a leading "reward" is accepted and dropped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reward"]:
        argv = argv[1:]
    args = _reward_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return _score(args)
    except TuneloopError as exc:
        print(f"tuneloop reward: {exc}", file=sys.stderr)
        return 1


def _score(args: argparse.Namespace) -> int:
    import math  # noqa: PLC0415

    from .algos.reward import reward_name  # noqa: PLC0415 - torch-heavy imports after parsing
    from .config import ComputeConfig  # noqa: PLC0415
    from .dpo import encode_completion  # noqa: PLC0415
    from .model import load_tokenizer, prepare_compute  # noqa: PLC0415
    from .reward_model import load_reward_model, reward_scores  # noqa: PLC0415

    if not args.prompt.strip() or not all(c.strip() for c in args.completion):
        raise InvalidArgument("--prompt and every --completion must be non-empty")
    registry = AdapterRegistry(args.registry_dir)
    version = registry.resolve(reward_name(args.adapter), args.version)
    if version.kind != REWARD:
        raise InvalidArgument(f"{version.name}@{version.version} is a {version.kind} adapter, not a reward model")
    model_dir = TrainerConfig(model_dir=args.model_dir).resolved_model_dir()
    base_id = base_model_fingerprint(model_dir)
    if version.base_model != base_id:
        raise FailedPrecondition(
            f"{version.name}@{version.version} was trained on {version.base_model!r}, not {base_id!r}; pass --model-dir"
        )
    compute = ComputeConfig()
    device, dtype = prepare_compute(compute)
    tok = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, version.path, compute, device, dtype, tok.pad_token_id)
    hp = version.manifest.get("hyperparameters", {})
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    max_p = int(hp.get("reward_max_prompt_tokens", 256))
    prompt = tuple(tok(prompt_text, add_special_tokens=False)["input_ids"][-max_p:])
    max_c = int(hp.get("reward_max_completion_tokens", 256))
    seqs = [(prompt, encode_completion(tok, c, max_c)) for c in args.completion]
    rewards = reward_scores(model, seqs, pad_id=tok.pad_token_id, device=device, dtype=dtype).tolist()
    scale = version.manifest.get("reward_scale", {})
    mean, std = float(scale.get("mean", 0.0)), float(scale.get("std", 1.0)) or 1.0
    anchor = float(scale.get("thumbs_anchor", 0.0))
    thresholds = [float(t) for t in scale.get("rating_thresholds", [])]
    rows = []
    for text, r in zip(args.completion, rewards, strict=True):
        cum = [1 / (1 + math.exp(-(t - r))) for t in thresholds] + [1.0]
        probs = [cum[0]] + [cum[k] - cum[k - 1] for k in range(1, len(cum))]
        rows.append({
            "completion": text, "reward": r, "z": (r - mean) / std, "p_thumbs_up": 1 / (1 + math.exp(-(r - anchor))),
            "likely_rating": 1 + max(range(len(probs)), key=probs.__getitem__) if thresholds else None,
        })  # fmt: skip
    print(f"reward model {version.name}@{version.version}", file=sys.stderr)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"reward {row['reward']:+.3f}  z {row['z']:+.2f}  P(thumbs up) {row['p_thumbs_up']:.2f}  "
                f"likely rating {row['likely_rating'] or '-'}  {row['completion'][:60]!r}"
            )
    return 0
