"""vLLM's LoRA kernels for the CPU, replaced by one matrix product per LoRA in the batch.

vLLM's CPU build applies LoRAs with its PyTorch ops (`vllm/lora/ops/torch_ops`), which index the
stacked LoRA weights with each token's slot. Two faults follow, both measured here:

- **Wrong output.** A token of a request with no LoRA has slot -1, which tensor indexing wraps to
  the last slot. Once `max_loras` LoRAs have been active (a slot keeps its weights when its LoRA is
  evicted), a request with no LoRA that shares a batch with a LoRA request is computed with the
  last slot's LoRA: its greedy text changes from its second token on. tuneloop's fast path serves
  the default version with no LoRA beside canaries and pinned versions on LoRAs, so this is the
  common case there. `tests/test_vllm_cpu_lora.py` shows it on the real engine.
- **Slow.** The ops copy every token's A and B matrices before multiplying (tokens x rank x width
  floats per layer and step, a fresh large allocation each time); the LoRA path ran at 0.29x the
  base model's throughput. One product per slot over that slot's tokens does the same arithmetic.

`GroupedPunicaWrapperCPU` keeps vLLM's wrapper (its metadata, its buffers, its call sites) and
replaces only the products: tokens are grouped by slot once per batch mapping, slot -1 is left
out. The arithmetic is vLLM's own (same dtypes: A products in float32, B products in the
model's dtype), summed by float32 matmuls (see `_product`). `use_grouped_lora_kernels()` makes
vLLM's CPU platform name it as its LoRA wrapper; `vllm_worker.py` calls it in vLLM's worker
process, where the wrapper is built. GPUs keep vLLM's Triton kernels, which skip slot -1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.platforms import current_platform

WRAPPER = "tuneloop.server.vllm_cpu_lora.GroupedPunicaWrapperCPU"


@dataclass(frozen=True)
class SlotRows:
    """The tokens (or sequences) of a batch grouped by LoRA slot."""

    groups: tuple[tuple[int, torch.Tensor | None], ...]  # (slot, row numbers; None: every row)
    every_row: bool  # every row has a LoRA (no slot -1)


def slot_rows(slots: torch.Tensor) -> SlotRows:
    """Groups rows by their LoRA slot; rows with slot -1 (no LoRA) are in no group."""
    if slots.numel() == 0:
        return SlotRows((), True)
    present = torch.unique(slots).tolist()
    if len(present) == 1:
        only = int(present[0])
        return SlotRows(((only, None),), True) if only >= 0 else SlotRows((), False)
    groups = tuple((s, (slots == s).nonzero().squeeze(1)) for s in present if s >= 0)
    return SlotRows(groups, present[0] >= 0)


def _slot(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's matrix from vLLM's stacked LoRA weights, (max_loras, 1, out, in) or (max_loras, out, in)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


def _product(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ w.T in `dtype`, as vLLM's ops compute it: both rounded to `dtype`, the product summed
    in float32 and rounded to `dtype` once. Computed by a float32 matmul: torch's bfloat16 matmul
    on CPU goes through oneDNN, which builds and keeps state for every new row count, and a
    batch's row counts change every step (1,200 shapes of these products grew a process by
    ~1 GB; float32 goes to a BLAS that keeps none)."""
    return (x.to(dtype).float() @ w.to(dtype).float().T).to(dtype)


def _per_slot(
    x: torch.Tensor, stacked: torch.Tensor, rows: SlotRows, dtype: torch.dtype, width: int | None = None
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """(row numbers or None for every row, those rows of x @ W[slot].T) for each slot in the batch;
    `width`: only W's first `width` outputs."""
    for slot, idx in rows.groups:
        xs = x if idx is None else x.index_select(0, idx)
        w = _slot(stacked, slot)
        yield idx, _product(xs, w if width is None else w[:width], dtype)


def shrink(x: torch.Tensor, stacked_a: torch.Tensor, y: torch.Tensor, rows: SlotRows, scale: float) -> None:
    """y[t, :rank] = scale * x[t] @ A[slot(t)].T, computed in y's dtype; rows with no LoRA get 0."""
    rank = stacked_a.size(-2)
    out = y[:, :rank]
    if not rows.every_row:
        out.zero_()
    for idx, prod in _per_slot(x, stacked_a, rows, y.dtype):
        prod.mul_(scale)
        if idx is None:
            out.copy_(prod)
        else:
            out.index_copy_(0, idx, prod)


def expand(
    x: torch.Tensor,
    stacked_b: torch.Tensor,
    y: torch.Tensor,
    rows: SlotRows,
    offset: int = 0,
    width: int | None = None,
    add: bool = True,
) -> None:
    """y[t, offset:offset + width] (+)= x[t] @ B[slot(t)].T, computed in y's dtype; rows with no
    LoRA are left as they are (add) or set to 0. `width` None: B's output size, cut to y's."""
    if width is None:
        width = min(stacked_b.size(-2), y.size(1) - offset)
    out = y[:, offset : offset + width]
    if not add and not rows.every_row:
        out.zero_()
    for idx, prod in _per_slot(x, stacked_b, rows, y.dtype, width):
        if idx is None:
            out.add_(prod) if add else out.copy_(prod)
        elif add:
            out.index_add_(0, idx, prod)
        else:
            out.index_copy_(0, idx, prod)


def use_grouped_lora_kernels() -> bool:
    """Make vLLM's CPU platform build `GroupedPunicaWrapperCPU` for its LoRA layers (in this
    process: call it in vLLM's worker before the model is loaded). Returns whether it did: on any
    other platform vLLM's kernels stay."""
    if not current_platform.is_cpu():
        return False
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER)  # type: ignore[method-assign,assignment]
    return True


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU LoRA wrapper with its products done per slot (see the module's docstring)."""

    _tokens = SlotRows((), False)
    _sequences = SlotRows((), False)

    def update_metadata(
        self,
        mapping: LoRAMapping,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # vLLM calls this whenever the batch's mapping changes; every layer of the step reuses it.
        self._tokens = slot_rows(self.token_lora_indices)
        self._sequences = slot_rows(self.sampler_indices)

    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        shrink(x, w_t_all, y, self._tokens, scale)

    _shrink_decode = _shrink_prefill

    def _expand_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        expand(x, w_t_all, y, self._tokens, add=add_inputs)

    _expand_decode = _expand_prefill

    def _expand_slice_prefill(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        expand(x, w_t_all, y, self._tokens, y_offset, y_slice_size, add_inputs)

    _expand_slice_decode = _expand_slice_prefill

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if buffer is None:  # float32, as vLLM's own
            buffer = torch.zeros((x2.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        shrink(x2, lora_a_stacked, buffer, self._sequences, scale)
        expand(buffer, lora_b_stacked, y2, self._sequences)
