"""The optimisation loop the policy trainers share (DPO, KTO): AdamW on the trainable LoRA
weights, seeded batch order, gradient clipping, a progress bar, and the per-step log."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from .config import DPOConfig
from .model import trainable_parameters


class _Step(Protocol):
    step: int
    loss: float


S = TypeVar("S", bound=_Step)


@dataclass
class TrainResult(Generic[S]):
    steps: int
    examples: int
    seconds: float
    log: list[S] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.log[0].loss if self.log else math.nan

    @property
    def last_loss(self) -> float:
        return self.log[-1].loss if self.log else math.nan


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Clip (when max_grad_norm > 0), step, and clear the accumulated gradients."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_epochs(
    model: torch.nn.Module,
    cfg: DPOConfig,
    *,
    examples: int,
    batches: Callable[[torch.Generator], Sequence[Sequence[int]]],
    step: Callable[[torch.optim.Optimizer, Sequence[int]], S],
    desc: str,
    postfix: Callable[[S], dict[str, str]],
    progress: bool = True,
    on_step: Callable[[S], None] | None = None,
) -> TrainResult[S]:
    """Train the active adapter of `model` in place for `cfg.epochs` epochs.

    Args:
        examples: the number of training examples (for the result).
        batches:  an epoch's batches of example indices, drawn from the run's seeded generator
                  (called once per epoch; every epoch has the same number of batches).
        step:     one optimizer step on one batch; returns its log entry (`step` is filled in here).
        postfix:  the progress bar's figures of a step.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; is the adapter loaded as trainable?")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    result: TrainResult[S] = TrainResult(steps=0, examples=examples, seconds=0.0)
    model.train()
    start = time.perf_counter()
    bar = tqdm(desc=desc, unit="step", disable=not progress, leave=False)
    try:
        for _epoch in range(cfg.epochs):
            epoch = batches(gen)
            bar.total = len(epoch) * cfg.epochs
            for idx in epoch:
                log = step(optimizer, idx)
                result.steps += 1
                log.step = result.steps
                result.log.append(log)
                bar.update(1)
                bar.set_postfix(postfix(log))
                if on_step is not None:
                    on_step(log)
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - start
    return result
