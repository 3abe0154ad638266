"""`tuneloop trainer once|run`: one training round now, or the sidecar that runs rounds as
feedback arrives.

Flags are generated from the config dataclasses (one flat flag per field, its help text from the
field); `--config FILE` reads a TOML file with top-level keys and [data] / [dpo] / [gate] /
[sidecar] tables first, and flags win over it. torch and the trainer's heavy modules are imported
only once the arguments are parsed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import tomllib
import typing
from typing import TYPE_CHECKING, Any

from tuneloop.server.config import is_loopback_host
from tuneloop.server.errors import TuneloopError
from tuneloop.server.registry import Registry
from tuneloop.server.settings import add_flags
from tuneloop.trainer.config import SECTIONS, TrainerConfig, leaf_fields

if TYPE_CHECKING:  # torch-heavy modules: imported at run time only once the arguments are parsed
    from tuneloop.trainer.distributed import Launch
    from tuneloop.trainer.metrics import TrainerMetrics
    from tuneloop.trainer.runner import RoundResult

log = logging.getLogger("tuneloop.trainer")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrainerConfig)
    return {name: hints[name] for name in SECTIONS}


def _add_fields(parser: argparse.ArgumentParser, cls: type, dest_prefix: str) -> None:
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__)
    add_flags(group, cls, leaf_fields(cls), dest_prefix)


DESCRIPTION = "Train LoRA adapters from user feedback."


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("trainer", help="train adapters from feedback (once, or as a sidecar)", description=DESCRIPTION)
    add_commands(p)
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser on its own (`tuneloop trainer ...` without the leading word)."""
    parser = argparse.ArgumentParser(prog="tuneloop trainer", description=DESCRIPTION)
    add_commands(parser)
    return parser


ONCE_EPILOG = """\
Several processes or GPUs (--algo dpo): start one process per CPU socket or GPU with torchrun,
  torchrun --nproc_per_node 2 -m tuneloop.cli trainer once --algo dpo [flags as above]
Each process trains its share of every batch (gloo between CPU processes, NCCL between GPUs); the
batch size, and so the result, are those of one process. Rank 0 alone reads the store, gates and
publishes; the others exit 0 when its round succeeds.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog's command lines kept as written."""


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_, epilog in (
        ("once", "Run one round: build the dataset, train, gate, publish.", ONCE_EPILOG),
        ("run", "Run the sidecar: start a round whenever enough new feedback arrived.", None),
    ):
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=_HelpFormatter)
        p.add_argument("--config", help="TOML file with any of the settings (flags win).")
        p.add_argument("--log-level", default="INFO", help="Log level.")
        _add_fields(p, TrainerConfig, "")
        for section, cls in _sections().items():
            _add_fields(p, cls, section + ".")


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
        if dest in ("command", "action", "run", "config", "log_level"):
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


def _setup_logging(level: str, rank: int | None = None) -> None:
    where = "" if rank is None else f"rank {rank} "
    if rank:  # the other ranks of a torchrun launch log what goes wrong; rank 0 tells the story
        level = logging.getLevelName(max(logging.getLevelName(level.upper()), logging.WARNING))
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from tuneloop.trainer.distributed import LaunchError, detect_launch  # noqa: PLC0415 - torch after parsing

    try:
        launch = detect_launch()
    except LaunchError as exc:
        print(f"tuneloop trainer: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args.log_level, None if launch is None else launch.rank)
    try:
        cfg = config_from_args(args)
        if launch is not None:
            from tuneloop.trainer.parallel_round import check_supported  # noqa: PLC0415

            check_supported(cfg, args.action)
    except (TuneloopError, OSError, tomllib.TOMLDecodeError, LaunchError) as exc:
        print(f"tuneloop trainer: {exc}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - torch-heavy imports after parsing

    from tuneloop.trainer.metrics import TrainerMetrics  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # our own bar shows the steps; weight loading needs none
    if launch is not None:
        return _run_data_parallel(cfg, launch, TrainerMetrics())
    from tuneloop.trainer.runner import run_round  # noqa: PLC0415
    from tuneloop.trainer.source import StoreSource  # noqa: PLC0415

    registry = cfg.open_registry()
    source = StoreSource.open(cfg.resolved_store_url())
    metrics = TrainerMetrics()
    try:
        if args.action == "once":
            result = run_round(cfg, source, registry, metrics=metrics)
            print(result.summary())
            return 0 if result.succeeded else 1
        return _run_sidecar(cfg, source, registry, metrics)
    finally:
        source.close()


def _run_data_parallel(cfg: TrainerConfig, launch: Launch, metrics: TrainerMetrics) -> int:
    """`trainer once` as one rank of a torchrun launch: rank 0 runs the round, the others train
    beside it (`tuneloop.trainer.parallel_round`)."""
    from tuneloop.trainer.distributed import CollectiveFailed, LaunchError, shutdown  # noqa: PLC0415
    from tuneloop.trainer.parallel_round import follow_round, join, lead_round  # noqa: PLC0415
    from tuneloop.trainer.runner import run_round  # noqa: PLC0415
    from tuneloop.trainer.source import StoreSource  # noqa: PLC0415

    try:
        parallel = join(cfg, launch)
    except (LaunchError, CollectiveFailed) as exc:
        print(f"tuneloop trainer: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, LaunchError) else 1
    try:
        if not parallel.is_main:
            try:
                return follow_round(parallel)
            except Exception:
                log.exception("rank %d of %d failed; the round fails with it", parallel.rank, parallel.world_size)
                return 1

        def round_() -> RoundResult:  # opening the registry or the store can fail: the others hear of it
            registry = cfg.open_registry()
            source = StoreSource.open(cfg.resolved_store_url())
            try:
                return run_round(cfg, source, registry, metrics=metrics, parallel=parallel)
            finally:
                source.close()

        result = lead_round(parallel, round_)
        print(result.summary())
        return 0 if result.succeeded else 1
    finally:
        shutdown(parallel)


def _run_sidecar(cfg: TrainerConfig, source: Any, registry: Registry, metrics: Any) -> int:
    from tuneloop.trainer.sidecar import Sidecar  # noqa: PLC0415

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
        "trainer sidecar for adapter %s (--algo %s): a round at %d new pairs, or every %.0f min with %d",
        cfg.adapter,
        cfg.algo,
        cfg.sidecar.min_new_pairs,
        cfg.sidecar.interval_minutes,
        cfg.sidecar.min_new_pairs_periodic,
    )
    Sidecar(cfg, source, registry, metrics).run(stop)
    return 0
