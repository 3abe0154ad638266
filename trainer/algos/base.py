"""The seam between the round runner and a training algorithm.

The runner owns what every algorithm shares: the data snapshot, the run key, idempotent
publishing into the registry, the trainer's metrics and the one-line summary. An algorithm owns
how a candidate is trained from the round's data, and its own part of the gate (DPO: held-out
preference accuracy; a reward model: ranking accuracy; PPO: the reward model's gain), on top of
the shared checks in `trainer/gate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneloop.server.registry import POLICY, AdapterVersion, Registry

from ..config import TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset
from ..gate import GateResult
from ..metrics import TrainerMetrics
from ..rows import CompletionRow, FeedbackRow


class FeedbackSource(Protocol):
    """Where completions and feedback come from (the store, in production)."""

    def load(self) -> tuple[list[CompletionRow], list[FeedbackRow]]: ...


@dataclass
class RoundInputs:
    """What a round hands to its algorithm."""

    cfg: TrainerConfig
    dataset: PreferenceDataset  # the round's preference pairs (its snapshot is the run key's data)
    source: FeedbackSource  # for what else an algorithm reads (prompts)
    model_dir: Path
    served: AdapterVersion | None  # the version serving now (the parent), if any
    registry: Registry
    metrics: TrainerMetrics
    # The round's thumbs and ratings, for algorithms with `uses_pointwise` (then in the run key too).
    pointwise: PointwiseDataset | None = None


@dataclass
class Candidate:
    """A trained, gated candidate, ready for the runner to publish."""

    verdict: GateResult
    metrics: dict[str, Any]  # manifest["metrics"]: gate figures, losses, timings
    save: Callable[[Path], None]  # writes the adapter files (peft layout) into a directory
    manifest: dict[str, Any] = field(default_factory=dict)  # algorithm-specific manifest entries
    kind: str = POLICY


class Algorithm(Protocol):
    """One family of training algorithms, selected by `--algo`."""

    name: str
    # Whether it learns from thumbs and ratings as well as pairs: then the round builds them and a
    # change in them alone makes a new run, not a duplicate.
    uses_pointwise: bool

    def target_name(self, cfg: TrainerConfig) -> str:
        """The registry name the algorithm publishes under."""
        ...

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        """The settings that change what it trains: in the run key and the manifest."""
        ...

    def train(self, inputs: RoundInputs) -> Candidate: ...


def training_figures(steps: int, seconds: float, losses: Sequence[float]) -> dict[str, Any]:
    """The manifest's figures of an optimisation run, alike for every algorithm that has a loss."""
    return {
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "steps": steps,
        "train_seconds": seconds,
        "loss_curve": [round(x, 6) for x in losses],
    }
