"""tuneloop's CPU LoRA kernels: the same products as vLLM's ops for every token with a LoRA, none
for a token without one; and on the real engine, a request with no LoRA beside a LoRA request
writes what it writes alone (with vLLM's own CPU ops it does not: `server/vllm_cpu_lora.py`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

from tuneloop.server.domain import SamplingSpec
from tuneloop.server.engine import EngineRequest, LoadedAdapter, next_adapter_id
from tuneloop.server.vllm_cpu_lora import expand, shrink, slot_rows

SLOTS, RANK, IN, OUT, TOKENS = 3, 4, 12, 10, 9

# Each token's LoRA slot (-1: no LoRA), as vLLM's batch mapping gives them.
CASES = {
    "one slot": [1] * TOKENS,
    "slots interleaved": [0, 2, 0, 1, 2, 2, 0, 1, 1],
    "some without a LoRA": [2, -1, 0, -1, -1, 2, 0, 1, -1],
    "none with a LoRA": [-1] * TOKENS,
}


def test_rows_are_grouped_by_slot_and_rows_without_a_lora_are_left_out() -> None:
    rows = slot_rows(torch.tensor(CASES["some without a LoRA"]))
    assert not rows.every_row
    assert [(s, idx.tolist() if idx is not None else None) for s, idx in rows.groups] == [
        (0, [2, 6]),
        (1, [7]),
        (2, [0, 5]),
    ]
    assert slot_rows(torch.tensor(CASES["one slot"])).groups == ((1, None),)
    assert slot_rows(torch.tensor(CASES["one slot"])).every_row
    assert slot_rows(torch.tensor(CASES["none with a LoRA"])).groups == ()
    assert slot_rows(torch.tensor([], dtype=torch.long)).groups == ()


@pytest.mark.parametrize("case", list(CASES))
def test_shrink_and_expand_match_vllms_ops_on_tokens_with_a_lora_and_leave_the_others_alone(case: str) -> None:
    g = torch.Generator().manual_seed(len(case))
    slots = torch.tensor(CASES[case])
    with_lora = slots >= 0
    rows = slot_rows(slots)
    x = torch.randn(TOKENS, IN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=g)  # vLLM's stacked shapes
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)

    ours, theirs = torch.full((TOKENS, RANK), 7.0), torch.zeros(TOKENS, RANK)
    shrink(x, a, ours, rows, 0.5)
    bgmv_shrink(x, a, theirs, slots.clamp_min(0), 0.5)
    torch.testing.assert_close(ours[with_lora], theirs[with_lora])
    assert (ours[~with_lora] == 0).all()  # no LoRA: nothing for the expand to add

    h = torch.randn(TOKENS, RANK, generator=g)
    y0 = torch.randn(TOKENS, OUT + 3, generator=g)
    ours, theirs = y0.clone(), y0.clone()
    expand(h, b, ours, rows)
    bgmv_expand(h, b, theirs, slots.clamp_min(0), add_inputs=True)
    torch.testing.assert_close(ours[with_lora], theirs[with_lora])
    assert torch.equal(ours[~with_lora], y0[~with_lora])

    ours, theirs = y0.clone(), y0.clone()
    expand(h, b[:, :, :3], ours, rows, offset=2, width=3, add=True)
    bgmv_expand_slice(h, b[:, :, :3], theirs, slots.clamp_min(0), 2, 3, add_inputs=True)
    torch.testing.assert_close(ours[with_lora], theirs[with_lora])
    assert torch.equal(ours[~with_lora], y0[~with_lora])

    ours, theirs = y0.clone(), y0.clone()
    expand(h, b[:, :, :3], ours, rows, offset=2, width=3, add=False)
    bgmv_expand_slice(h, b[:, :, :3], theirs, slots.clamp_min(0), 2, 3, add_inputs=False)
    torch.testing.assert_close(ours[with_lora], theirs[with_lora])
    assert (ours[~with_lora, 2:5] == 0).all() and torch.equal(ours[:, :2], y0[:, :2])


def test_products_keep_vllms_dtypes() -> None:
    """A's product in the buffer's float32, B's in the model's dtype, as vLLM's ops compute them."""
    g = torch.Generator().manual_seed(3)
    slots = torch.tensor([0, 1, -1, 0])
    x = torch.randn(4, IN, generator=g).bfloat16()
    a = torch.randn(2, 1, RANK, IN, generator=g).bfloat16()
    b = torch.randn(2, 1, OUT, RANK, generator=g).bfloat16()
    ours, theirs = torch.zeros(4, RANK), torch.zeros(4, RANK)
    shrink(x, a, ours, slot_rows(slots), 1.0)
    bgmv_shrink(x, a, theirs, slots.clamp_min(0), 1.0)
    torch.testing.assert_close(ours[:2], theirs[:2])
    y_ours, y_theirs = torch.zeros(4, OUT).bfloat16(), torch.zeros(4, OUT).bfloat16()
    expand(ours, b, y_ours, slot_rows(slots))
    bgmv_expand(theirs, b, y_theirs, slots.clamp_min(0), add_inputs=True)
    torch.testing.assert_close(y_ours[:2], y_theirs[:2])


async def test_a_request_with_no_lora_beside_a_lora_request_writes_what_it_writes_alone(
    engine, lora_dirs: dict[str, Path]
) -> None:
    """Every LoRA slot has held a LoRA, then a request with no LoRA shares its batches with a LoRA
    request: its greedy tokens must be those it gets alone (vLLM's CPU ops gave it the last slot's
    LoRA from its second token on)."""
    engine.serve_folded(None, at_once=True)  # the bare base in the weights (an earlier test may have folded one)
    await engine.settled()
    assert engine.folded == ""  # so a request for the bare base runs with no LoRA
    adapters = [LoadedAdapter(f"slot-test@{k}", next_adapter_id(), str(lora_dirs[k])) for k in ("r8a", "r8b")]
    prompt = engine.tokenize("The history of the city of Paris is")

    async def tokens(request_id: str, adapter: LoadedAdapter | None, max_tokens: int = 24) -> list[int]:
        out: list[int] = []
        spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0)
        async for delta in engine.generate(EngineRequest(request_id, prompt, spec, adapter)):
            out.extend(delta.token_ids)
        return out

    alone = await tokens("slot-test-alone", None)
    for i, adapter in enumerate(adapters):  # the test engine has max_loras=2: both slots hold one now
        await tokens(f"slot-test-fill-{i}", adapter, max_tokens=2)
    beside, on_lora = await asyncio.gather(tokens("slot-test-beside", None), tokens("slot-test-lora", adapters[-1]))
    assert on_lora != alone  # the LoRA request did run on its LoRA, in the same batches
    assert beside == alone
    for adapter in adapters:
        await engine.remove_adapter(adapter)
