"""Tokens a training round pushes through the model: the compute figure that compares algorithms
(a DPO pass over pairs, KTO over single replies, a reward model then PPO with its rollouts) on
equal terms, whatever the hardware's speed.

Every model the trainer loads gets a forward pre-hook on its transformer backbone (the module every
head and every peft wrapper calls, so a hook there sees each pass once). A pass run with gradients
enabled is one that is backpropagated: its tokens count as forward and backward; a pass under
`torch.no_grad` (references, rollouts, scoring, the gate's samples) as forward only. Tokens are the
real ones (the attention mask's), not the padding, and a generation step counts the tokens it adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenCounts:
    forward: int = 0  # every token through a forward pass, with or without a backward pass
    backward: int = 0  # the tokens of passes run with gradients (backpropagated)

    def since(self, start: TokenCounts) -> TokenCounts:
        return TokenCounts(self.forward - start.forward, self.backward - start.backward)

    def copy(self) -> TokenCounts:
        return TokenCounts(self.forward, self.backward)


# One per process: a round (and a reward round nested in a PPO round) reads the difference.
COUNTS = TokenCounts()


def pass_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The real tokens one backbone call computes: the new positions (`input_ids` or
    `inputs_embeds`), less those the attention mask marks as padding."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    shape = ids.shape if isinstance(ids, torch.Tensor) else None
    if shape is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        shape = kwargs["inputs_embeds"].shape[:2]
    if shape is None or len(shape) != 2:
        return 0
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == shape[0] and mask.shape[1] >= shape[1]:
        # With a KV cache the mask spans the whole sequence; the new tokens are its last columns.
        return int(mask[:, mask.shape[1] - shape[1] :].sum())
    return int(shape[0] * shape[1])


def count_tokens(model: torch.nn.Module) -> None:
    """Count every pass of `model` (a transformers model) into `COUNTS`."""
    backbone = getattr(model, "base_model", model)

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        n = pass_tokens(args, kwargs)
        COUNTS.forward += n
        if torch.is_grad_enabled():
            COUNTS.backward += n

    backbone.register_forward_pre_hook(hook, with_kwargs=True)
