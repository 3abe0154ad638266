"""The seam between the round runner and a training algorithm.

The runner owns what every algorithm shares: the data snapshot, the run key, idempotent
publishing into the registry, the trainer's metrics and the one-line summary. An algorithm owns
which part of the round's data it trains on, how a candidate is trained from it, and its own part
of the gate (DPO: held-out preference accuracy; KTO: the implicit reward's AUC between desirable and
undesirable examples; a reward model: ranking accuracy; PPO: the reward model's gain), on top of
the shared checks in `trainer/gate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from tuneloop.server.registry import POLICY, AdapterVersion, Registry

from ..config import DPOConfig, TrainerConfig
from ..dataset import PointwiseDataset, PreferenceDataset
from ..distributed import DataParallel
from ..gate import GateMetrics, GateResult, decide
from ..metrics import TrainerMetrics
from ..model import SERVED, TRAINED, build_policy, load_base_model, load_tokenizer, prepare_compute
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
    # The ranks of a torchrun launch, for algorithms with `data_parallel`; None in one process.
    parallel: DataParallel | None = None


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
    # Whether it trains across the processes of a torchrun launch (`RoundInputs.parallel`).
    data_parallel: bool

    def target_name(self, cfg: TrainerConfig) -> str:
        """The registry name the algorithm publishes under."""
        ...

    def settings(self, cfg: TrainerConfig) -> dict[str, Any]:
        """The settings that change what it trains: in the run key and the manifest."""
        ...

    def training_data(
        self, cfg: TrainerConfig, pairs: PreferenceDataset, pointwise: PointwiseDataset | None
    ) -> tuple[PreferenceDataset, PointwiseDataset | None]:
        """The part of the round's pairs and judgements it trains on (`pointwise` is given when it
        `uses_pointwise`): what the round counts, keys and records as used."""
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


@dataclass
class Policy:
    """A round's trainable LoRA policy on the base model, and how it runs."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    reference: str  # the frozen reference's adapter mode: "base", or SERVED when rounds chain
    reference_name: str  # for the manifest: "base" or "<adapter>:<served version>"

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def manifest(self) -> dict[str, Any]:
        """The manifest entries every policy algorithm records."""
        return {
            "reference": self.reference_name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
        }

    def save(self, out: Path) -> None:
        """The trained adapter only (not the served one loaded beside it), in peft's layout."""
        self.model.save_pretrained(str(out), selected_adapters=[TRAINED])


def load_policy(inputs: RoundInputs, lora: DPOConfig) -> Policy:
    """The base model with a trainable adapter shaped by `lora` (a copy of the served one when
    `lora.reference` is "served" and one is served: rounds chain), and the served adapter
    read-only beside it when there is one."""
    return round_policy(inputs.cfg, inputs.model_dir, inputs.served, lora)


def round_policy(cfg: TrainerConfig, model_dir: Path, served: AdapterVersion | None, lora: DPOConfig) -> Policy:
    """`load_policy` from its parts (the other ranks of a data-parallel round have no RoundInputs)."""
    device, dtype = prepare_compute(cfg.compute)
    chain = lora.reference == "served" and served is not None
    model = build_policy(
        load_base_model(model_dir, device, dtype, cfg.compute.attn_implementation),
        lora,
        served_adapter=served.path if served else None,
        init_from_served=chain,
    )
    name = f"{cfg.adapter}:{served.version}" if chain and served else "base"
    return Policy(model, load_tokenizer(model_dir), device, dtype, SERVED if chain else "base", name)


def gate_verdict(m: GateMetrics, inputs: RoundInputs) -> GateResult:
    """The gate's decision on a policy candidate's figures, reported to the trainer's metrics."""
    verdict = decide(m, inputs.cfg.gate)
    inputs.metrics.kl.set(m.kl_per_token)
    inputs.metrics.gate_checked(m.nll_increase_per_token, verdict.failed_checks)
    return verdict
