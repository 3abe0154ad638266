"""The trainer's token accounting (pure logic on tensors; the hook on a real model is exercised by
the trainer's round tests through the manifest)."""

from __future__ import annotations

import torch

from tuneloop.trainer.accounting import COUNTS, TokenCounts, count_tokens, pass_tokens


def test_padding_is_not_counted() -> None:
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert pass_tokens((), {"input_ids": ids, "attention_mask": mask}) == 6
    assert pass_tokens((ids,), {}) == 8  # no mask: every position


def test_a_generation_step_counts_only_its_new_tokens() -> None:
    step = torch.ones(2, 1, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])  # the second row already ended
    assert pass_tokens((), {"input_ids": step, "attention_mask": mask}) == 1
    assert pass_tokens((), {"inputs_embeds": torch.zeros(3, 2, 8)}) == 6
    assert pass_tokens((), {}) == 0


class _Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w * input_ids.float()


class _WithHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Backbone()

    @property
    def base_model(self) -> torch.nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).sum()


def test_passes_with_gradients_count_as_backward_too() -> None:
    model = _WithHead()
    count_tokens(model)
    start = COUNTS.copy()
    model(torch.ones(2, 3)).backward()
    with torch.no_grad():
        model(torch.ones(1, 5))
    assert COUNTS.since(start) == TokenCounts(forward=11, backward=6)
