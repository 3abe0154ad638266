"""Data-parallel training across processes started by torchrun: the one module that touches
torch.distributed.

A launch is detected from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). Without them,
or with WORLD_SIZE=1, nothing here runs: a single-process round never creates a process group.

Every rank holds the whole round's data (rank 0 broadcasts it) and the same seeded batch order, so
the ranks agree on each global batch without talking; each computes the gradient of its own shard
of it, and one all-reduce per optimizer step sums the trainable (LoRA) gradients. The frozen base
model's weights never cross the wire.

A rank that fails leaves the others blocked in a collective: the process group's timeout bounds
that wait, and torchrun stops the remaining ranks as soon as one exits non-zero. A rank whose
collective failed (`CollectiveFailed`) or that left the agreed sequence of collectives mid-way
(an exception inside `lockstep`) makes no further collective call.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# The variables torchrun (torch.distributed.run) sets in every process it starts.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """The environment names a multi-process launch that cannot run as given."""


class CollectiveFailed(RuntimeError):
    """A collective with the other ranks failed: another rank died, or did not arrive in time."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch this process belongs to, or None for a plain single-process run
    (no WORLD_SIZE, or WORLD_SIZE=1: there is nobody to talk to)."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
        return None
    missing = [v for v in LAUNCH_VARS if not env.get(v)]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} not set: start the processes with "
            "torchrun (python -m torch.distributed.run), which sets them all"
        )
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    except ValueError as exc:
        raise LaunchError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from None
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"RANK={launch.rank} is outside 0..WORLD_SIZE-1 ({launch.world_size - 1})")
    return launch


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items: sizes differ by at most one, the
    first `n % world_size` ranks taking the extra item; a rank's share is empty when n < world_size."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DataParallel:
    """An initialised process group and the collectives a data-parallel round uses."""

    def __init__(self, launch: Launch, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.device = device
        self.backend = backend_for(device)
        self._usable = True

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads the store, gates, publishes and reports."""
        return self.rank == 0

    @property
    def usable(self) -> bool:
        """False once a collective failed or this rank left the ranks' common sequence of calls."""
        return self._usable

    def manifest(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of `items` (every rank sees the same `items`)."""
        start, stop = shard_bounds(len(items), self.world_size, self.rank)
        return list(items[start:stop])

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled; the others pass nothing)."""
        box = [obj if self.is_main else None]
        self._collective("broadcast", lambda dist: dist.broadcast_object_list(box, src=0, device=self._comm_device))
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of every rank's `tensor` (same shape everywhere), on tensor's device."""
        buf = tensor.detach().to(self._comm_device, copy=True)
        self._collective("all_reduce", lambda dist: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        return buf.to(tensor.device)

    def gather_shards(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The (..., n) tensor whose last dimension the ranks computed in `shard` shares: `local`
        is this rank's (..., share). Each rank fills its columns of zeros and the sum joins them,
        exactly (x + 0 == x)."""
        start, stop = shard_bounds(n, self.world_size, self.rank)
        full = torch.zeros((*local.shape[:-1], n), dtype=local.dtype, device=local.device)
        full[..., start:stop] = local
        return self.sum(full)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks, in one all-reduce. A rank
        with no examples in this step (a global batch smaller than the world) sends zeros."""
        flat = self.sum(_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]))
        for p, part in zip(params, _split(flat, params), strict=True):
            p.grad = part.to(p.dtype)

    def sync_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values into every rank's `params` (one broadcast), so all ranks start from
        one adapter whatever their random state."""
        flat = _flat([p.detach() for p in params]).to(self._comm_device)
        self._collective("broadcast", lambda dist: dist.broadcast(flat, src=0))
        with torch.no_grad():
            for p, part in zip(params, _split(flat, params), strict=True):
                p.copy_(part)

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """A stretch where every rank makes the same collective calls in the same order. An
        exception inside leaves the others waiting on a call this rank will not make, so no later
        collective is attempted (it would pair with the wrong one)."""
        try:
            yield
        except BaseException:
            self._usable = False
            raise

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _collective(self, what: str, call: Callable[[Any], object]) -> None:
        if not self._usable:
            raise CollectiveFailed(f"rank {self.rank}: no {what} after an earlier failure with the other ranks")
        import torch.distributed as dist  # noqa: PLC0415 - only data-parallel runs reach here

        try:
            call(dist)
        except Exception as exc:  # gloo and NCCL raise their own RuntimeError subclasses and wording
            self._usable = False
            raise CollectiveFailed(
                f"rank {self.rank} of {self.world_size}: {what} with the other ranks failed ({exc}); another "
                "rank failed or did not arrive within --collective-timeout-minutes: see its log"
            ) from exc


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut back into tensors shaped as `like`, on their devices."""
    parts = torch.split(flat, [t.numel() for t in like])
    return [part.view_as(t).to(t.device) for part, t in zip(parts, like, strict=True)]


def init_data_parallel(launch: Launch, device: torch.device, timeout_minutes: float) -> DataParallel:
    """Join the process group torchrun set up (env:// rendezvous). On a GPU, each rank takes the
    device LOCAL_RANK names, so `torch.device("cuda")` means that device from here on."""
    import torch.distributed as dist  # noqa: PLC0415 - only data-parallel runs reach here

    if not dist.is_available():
        raise LaunchError("this torch build has no torch.distributed; run the trainer as one process")
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"LOCAL_RANK={launch.local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    parallel = DataParallel(launch, device)
    try:
        dist.init_process_group(
            backend=parallel.backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            rank=launch.rank,
            world_size=launch.world_size,
        )
    except Exception as exc:  # the rendezvous store's and the backend's own errors
        raise CollectiveFailed(
            f"rank {launch.rank} of {launch.world_size} could not join the process group ({exc}); another rank "
            "failed to start or did not arrive within --collective-timeout-minutes: see its log"
        ) from exc
    log.info("rank %d of %d joined the process group (%s)", launch.rank, launch.world_size, parallel.backend)
    return parallel


def shutdown(parallel: DataParallel) -> None:
    """Leave the process group (after a failure too: destroying it does not wait for the others)."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        dist.destroy_process_group()
