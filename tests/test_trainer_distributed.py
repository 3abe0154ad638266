"""Data-parallel DPO under torchrun: two CPU processes (gloo) train the same round as one process,
rank 0 alone publishes, and what cannot run across processes is refused before any process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from trainer_fixtures import BAD, GOOD, QUESTIONS, chat_prompt

from tuneloop.cli.main import main
from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.distributed import (
    DataParallel,
    Launch,
    LaunchError,
    detect_launch,
    init_data_parallel,
    shard_bounds,
)
from tuneloop.trainer.parallel_round import RoundOver, follow_round, lead_round
from tuneloop.trainer.runner import RoundResult

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_a_launch_is_read_from_torchruns_variables() -> None:
    assert detect_launch({}) is None
    assert detect_launch({**TORCHRUN_ENV, "WORLD_SIZE": "1"}) is None  # one process: nothing to talk to
    assert detect_launch({**TORCHRUN_ENV, "RANK": "1", "LOCAL_RANK": "1"}) == Launch(1, 2, 1)
    with pytest.raises(LaunchError, match="MASTER_PORT not set: start the processes with torchrun"):
        detect_launch({k: v for k, v in TORCHRUN_ENV.items() if k != "MASTER_PORT"})
    with pytest.raises(LaunchError, match="outside"):
        detect_launch({**TORCHRUN_ENV, "RANK": "2"})


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this host has a GPU for each of two ranks")
def test_a_gpu_launch_with_more_ranks_than_gpus_is_refused_before_joining() -> None:
    with pytest.raises(LaunchError, match="LOCAL_RANK=1 but this machine has [01] CUDA device"):
        init_data_parallel(Launch(1, 2, 1), torch.device("cuda"), timeout_minutes=1)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("n", "world"), [(3, 2), (8, 3), (1, 2), (0, 2), (4, 4)])
def test_shards_cover_a_batch_once_in_order_with_sizes_one_apart(n: int, world: int) -> None:
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["once", "--algo", "kto"], "--algo kto does not train across processes; a torchrun launch supports --algo"),
        (["once", "--algo", "auto"], "a torchrun launch supports --algo dpo. Run --algo auto as one process"),
        (["run"], "'tuneloop trainer run' runs as one process; under torchrun use 'tuneloop trainer once'"),
    ],
)
def test_a_torchrun_launch_refuses_what_does_not_run_across_processes(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    code = main(["trainer", *argv, "--store-url", f"sqlite:///{tmp_path}/s.db", "--registry-dir", str(tmp_path)])
    assert code == 2 and message in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # refused before joining: no peer waits for this one


class Wire(DataParallel):
    """The broadcasts of a two-rank group, without a process group: what rank 0 sent, and what a
    follower receives, in order."""

    def __init__(self, rank: int, inbox: list[object] | None = None) -> None:
        super().__init__(Launch(rank, 2, rank), torch.device("cpu"))
        self.sent: list[object] = []
        self.inbox = list(inbox or [])

    def broadcast(self, obj: object = None) -> object:
        if self.is_main:
            self.sent.append(obj)
            return obj
        return self.inbox.pop(0)


class Work:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.ran = fail, 0

    def run(self, parallel: DataParallel) -> None:
        self.ran += 1
        if self.fail:
            raise MemoryError("out of memory")


@pytest.mark.parametrize(("outcome", "status"), [("published", 0), ("rejected", 0), ("skipped", 0), ("failed", 1)])
def test_a_follower_does_its_work_then_exits_as_rank_0s_round_ended(outcome: str, status: int) -> None:
    work = Work()
    assert follow_round(Wire(1, [work, RoundOver(outcome)])) == status and work.ran == 1


def test_a_follower_whose_work_fails_makes_no_further_collective() -> None:
    wire = Wire(1, [Work(fail=True), RoundOver("published")])
    with pytest.raises(MemoryError):
        follow_round(wire)
    assert not wire.usable and len(wire.inbox) == 1


def test_rank_0_tells_the_others_how_the_round_ended_unless_it_left_the_lockstep() -> None:
    wire = Wire(0)
    assert lead_round(wire, lambda: RoundResult("rejected")).outcome == "rejected"
    assert wire.sent == [RoundOver("rejected")]

    def store_down() -> RoundResult:
        raise OSError("store unreachable")

    wire = Wire(0)
    with pytest.raises(OSError):
        lead_round(wire, store_down)
    assert wire.sent == [RoundOver("failed")]  # the others exit 1 rather than wait for a timeout

    def failed_mid_training() -> RoundResult:
        try:
            with wire.lockstep():
                raise MemoryError("out of memory")
        except MemoryError:  # run_round turns it into a failed round
            return RoundResult("failed", reason="MemoryError: out of memory")

    wire = Wire(0)
    assert lead_round(wire, failed_mid_training).outcome == "failed"
    assert wire.sent == []  # the others wait in a collective rank 0 will not make: torchrun stops them


async def write_pairs(store_url: str) -> None:
    """One pairwise choice (friendly over curt) per toy question, through the feedback service."""
    from completion_factory import make_completion

    from tuneloop.server.feedback import FeedbackEvent
    from tuneloop.server.feedback.service import FeedbackService
    from tuneloop.server.metrics import Metrics
    from tuneloop.server.store import open_store

    store = open_store(store_url)
    service = FeedbackService(store, Metrics(CollectorRegistry()))
    service.start()
    for i, q in enumerate(QUESTIONS):
        good, bad = make_completion(chat_prompt(q), GOOD), make_completion(chat_prompt(q), BAD)
        store.write_completions([good, bad])
        await service.submit(FeedbackEvent(
            rater_id=f"rater{i % 4}", kind="pairwise", completion_id=good.completion_id,
            second_completion_id=bad.completion_id, choice="first",
        ))  # fmt: skip
    await service.close()
    store.close()


def round_args(store_url: str, registry: Path, model_dir: Path) -> list[str]:
    # Batches of 3 split 2 + 1 over two ranks: a mean of the ranks' mean losses would weight the
    # lone pair double, so the comparison below sees a wrong normalisation. float32 on the CPU
    # makes both runs compute the same sums up to rounding order.
    return [
        "trainer", "once", "--algo", "dpo", "--store-url", store_url, "--registry-dir", str(registry),
        "--model-dir", str(model_dir), "--adapter", "toy", "--publish", "current", "--no-progress",
        "--min-train-pairs", "4", "--min-heldout-pairs", "2", "--heldout-fraction", "0.34",
        "--batch-size", "3", "--epochs", "1", "--learning-rate", "2e-3", "--max-prompt-tokens", "48",
        "--max-completion-tokens", "24", "--seed", "3", "--device", "cpu", "--dtype", "float32",
        "--eval-prompts", "2", "--samples-per-prompt", "1", "--sample-max-tokens", "4",
        "--max-kl-per-token", "5", "--min-diversity-ratio", "0.3", "--max-nll-increase-per-token", "5",
    ]  # fmt: skip


async def test_two_processes_train_the_round_one_process_trains_and_rank_0_alone_publishes(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    await write_pairs(store_url)
    assert main(round_args(store_url, tmp_path / "one", model_dir)) == 0
    assert not torch.distributed.is_initialized()  # one process: no process group
    assert "outcome=published" in capsys.readouterr().out
    # --standalone: a rendezvous on a free local port; torchrun's default gives each rank one thread.
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tuneloop.cli", *round_args(store_url, tmp_path / "two", model_dir)],
        capture_output=True, text=True, timeout=480, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainer round: outcome=published") == 1  # rank 0's summary, and only its

    one, two = AdapterRegistry(tmp_path / "one").versions("toy"), AdapterRegistry(tmp_path / "two").versions("toy")
    assert [v.version for v in two] == ["v1"] and AdapterRegistry(tmp_path / "two").channel("toy") == "v1"
    assert two[0].manifest["data_parallel"] == {"world_size": 2, "backend": "gloo"}
    assert "data_parallel" not in one[0].manifest
    assert two[0].manifest["run_key"] == one[0].manifest["run_key"]  # the same round, wherever it ran
    # Every step's loss is the global batch's mean. Tolerance: float32 sums in another order (the
    # reference scored in other batch shapes, two partial gradients summed) differ by ~1e-7
    # relative; 1e-4 leaves room for three Adam steps to carry that, and is far below what a
    # mean of per-rank means does to steps 2-3 (their gradient weights one pair double).
    curve_one, curve_two = one[0].manifest["metrics"]["loss_curve"], two[0].manifest["metrics"]["loss_curve"]
    assert len(curve_one) == 3 and curve_two == pytest.approx(curve_one, rel=1e-4)
    assert curve_one[-1] < curve_one[0]
    # The published LoRA weights: Adam divides each coordinate's step by its gradient's magnitude,
    # so a coordinate whose gradient is rounding noise can step differently; the whole update
    # must agree to 1e-3 of its norm.
    w_one = load_file(str(one[0].path / "adapter_model.safetensors"))
    w_two = load_file(str(two[0].path / "adapter_model.safetensors"))
    assert w_one.keys() == w_two.keys()
    b_keys = [k for k in w_one if "lora_B" in k]  # B starts at zero: its weights are the update itself
    diff = torch.sqrt(sum(((w_two[k] - w_one[k]) ** 2).sum() for k in w_one))
    update = torch.sqrt(sum((w_one[k] ** 2).sum() for k in b_keys))
    assert update > 0 and diff <= 1e-3 * update, (float(diff), float(update))


def torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`script` run by two CPU processes under torchrun (a free local port; one thread each)."""
    path = cwd / "launch.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *args],
        capture_output=True, text=True, timeout=480, env=env, cwd=cwd,
    )  # fmt: skip


# Rank 1 never reaches the collective rank 0 waits in (it waits on an event nobody sets, until
# torchrun stops it when rank 0 exits). The timeout also bounds joining the group, so it leaves
# room for the two processes' imports to finish at different times on a loaded host.
_ABSENT_PEER = """
import sys, threading, torch
from tuneloop.trainer.distributed import CollectiveFailed, detect_launch, init_data_parallel, shutdown
parallel = init_data_parallel(detect_launch(), torch.device("cpu"), timeout_minutes=0.25)
if parallel.rank == 1:
    threading.Event().wait()
try:
    parallel.sum(torch.ones(3))
except CollectiveFailed as exc:
    print(exc, flush=True)
    shutdown(parallel)
    sys.exit(3)
"""


def test_a_rank_that_does_not_arrive_fails_the_collective_after_the_timeout(tmp_path: Path) -> None:
    proc = torchrun(_ABSENT_PEER, cwd=tmp_path)
    assert proc.returncode != 0
    assert "rank 0 of 2: all_reduce with the other ranks failed" in proc.stdout, proc.stderr[-3000:]
    assert "did not arrive within --collective-timeout-minutes" in proc.stdout


# Rank 1 fails once the ranks have exchanged the reference log-probs, as an out-of-memory would.
_FAILING_RANK = """
import os, sys
from tuneloop.trainer.algos import dpo
if os.environ["RANK"] == "1":
    def out_of_memory(*_a, **_k):
        raise MemoryError("rank 1 ran out of memory")
    dpo.train_dpo = out_of_memory
from tuneloop.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


async def test_a_failing_rank_fails_the_round_and_nothing_is_published(tmp_path: Path, model_dir: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    await write_pairs(store_url)
    proc = torchrun(_FAILING_RANK, *round_args(store_url, tmp_path / "reg", model_dir), cwd=tmp_path)
    assert proc.returncode != 0
    assert "rank 1 of 2 failed; the round fails with it" in proc.stderr
    assert "MemoryError: rank 1 ran out of memory" in proc.stderr
    assert "outcome=published" not in proc.stdout
    assert AdapterRegistry(tmp_path / "reg").versions("toy") == []
