"""One round across the processes of a torchrun launch.

Rank 0 runs the round as one process would (store, dataset, run key, gate, publish) with the
other ranks joining in its training; ranks > 0 never open the store or the registry. They wait
for what rank 0 broadcasts: a share of training work (an object with `run(parallel)`, such as
`algos.dpo.DPOShare`), or the round's end, whose outcome becomes their exit status, so torchrun
reports success exactly when rank 0's round succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .algos import ALGORITHMS
from .config import TrainerConfig
from .distributed import DataParallel, Launch, LaunchError, init_data_parallel
from .model import resolve_device
from .runner import RoundResult, succeeded

log = logging.getLogger(__name__)


class ShareOfWork(Protocol):
    """Training that every rank > 0 does beside rank 0, with the collectives it makes too."""

    def run(self, parallel: DataParallel) -> None: ...


@dataclass(frozen=True)
class RoundOver:
    """Rank 0's last message: the round's outcome."""

    outcome: str

    @property
    def ok(self) -> bool:
        return succeeded(self.outcome)


def data_parallel_algorithms() -> list[str]:
    return [name for name, algo in ALGORITHMS.items() if algo.data_parallel]


def check_supported(cfg: TrainerConfig, action: str) -> None:
    """Refuse, before any process group exists, what cannot run across processes."""
    if action != "once":
        raise LaunchError(
            f"'tuneloop trainer {action}' runs as one process; under torchrun use 'tuneloop trainer once' "
            "(one round per launch)"
        )
    supported = data_parallel_algorithms()
    if cfg.algo not in supported:
        raise LaunchError(
            f"--algo {cfg.algo} does not train across processes; a torchrun launch supports --algo "
            f"{' or '.join(supported)}. Run --algo {cfg.algo} as one process: tuneloop trainer once --algo {cfg.algo}"
        )


def join(cfg: TrainerConfig, launch: Launch) -> DataParallel:
    """This rank's process group, on the device the policy trains on (so NCCL between GPUs)."""
    return init_data_parallel(launch, resolve_device(cfg.compute.device), cfg.compute.collective_timeout_minutes)


def lead_round(parallel: DataParallel, round_: Callable[[], RoundResult]) -> RoundResult:
    """Rank 0: run the round (`run_round(..., parallel=parallel)`), then tell the other ranks how
    it ended. When rank 0 left the ranks' common sequence of collectives mid-training, they are
    blocked in one it will not make: nothing is sent, and torchrun stops them once rank 0 exits."""
    outcome = "failed"
    try:
        result = round_()
        outcome = result.outcome
        return result
    finally:
        if parallel.usable:
            parallel.broadcast(RoundOver(outcome))


def follow_round(parallel: DataParallel) -> int:
    """Ranks > 0: do each share of work rank 0 sends until it reports the round's end; the exit
    status is 0 when rank 0's round succeeded (published, rejected by the gate, skipped...)."""
    while True:
        message = parallel.broadcast()
        if isinstance(message, RoundOver):
            if not message.ok:
                log.warning("rank %d: rank 0 ended the round with outcome=%s", parallel.rank, message.outcome)
            return 0 if message.ok else 1
        work: ShareOfWork = message
        with parallel.lockstep():
            work.run(parallel)
