"""tuneloop's seeded sampling (server/seeded_sampling.py) and the engine's pure helpers around it:
the sample is a function of (logits, settings, seed, position) alone and has the right law."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator

import pytest
import torch

from tuneloop.server.engine import EngineDelta, batched_tokens, merge_candidates, sampling_modes
from tuneloop.server.seeded_sampling import mix, restrict, seeded_token

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_same_seed_and_position_give_the_same_token_and_others_vary() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    first = [seeded_token(logits, 1.0, 1.0, 0, seed=7, position=t) for t in range(32)]
    again = [seeded_token(logits.clone(), 1.0, 1.0, 0, seed=7, position=t) for t in range(32)]
    other = [seeded_token(logits, 1.0, 1.0, 0, seed=8, position=t) for t in range(32)]
    assert first == again
    assert first != other
    assert len(set(first)) > 10  # positions draw independent noise, not one token repeated


def test_a_request_resumed_with_its_output_in_the_prompt_samples_at_the_positions_it_would_have() -> None:
    # After a fold preempts it (server/fast_path.py), a seeded request continues as a new engine
    # request whose own output starts empty: `start` carries the position it had reached.
    from vllm import SamplingParams

    from tuneloop.server.seeded_sampling import seeded_extra_args
    from tuneloop.server.vllm_sampling import SeededSampler

    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))

    def token(extra: dict[str, object], output_ids: list[int]) -> int:
        sampler = SeededSampler.__new__(SeededSampler)
        sampler._rows = {0: SeededSampler._row(SamplingParams(extra_args=extra), None, output_ids)}
        return int(sampler.apply(logits.clone())[0].argmax())

    whole = [token(seeded_extra_args(9, 1.0, 1.0, 0), [0] * t) for t in range(6)]
    resumed = [token(seeded_extra_args(9, 1.0, 1.0, 0, start=3), [0] * t) for t in range(3)]
    assert resumed == whole[3:]
    assert whole[:3] != whole[3:]  # the positions differ: the test can tell them apart


def test_mix_separates_neighbouring_seeds_and_positions() -> None:
    values = {mix(s, t) for s in range(50) for t in range(50)}
    assert len(values) == 2500
    assert all(0 <= v < 2**64 for v in values)
    assert mix(2**64 - 1, 10**9) < 2**64  # the API's uint64 seeds fit


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_samples_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    n = 6000
    counts = Counter(seeded_token(LOGITS, temperature, 1.0, 0, seed=s, position=3) for s in range(n))
    probs = torch.softmax(LOGITS / temperature, -1).tolist()
    # Pearson's chi-square over the 6 tokens (5 degrees of freedom): 20.5 is the 0.999 quantile.
    # The seeds are fixed, so this cannot flake; a biased sampler (e.g. noise not Gumbel, or the
    # temperature ignored) lands far above it.
    chi2 = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if n * p >= 1)
    assert chi2 < 20.5, (chi2, counts, probs)


def test_top_k_and_top_p_keep_the_tokens_vllm_keeps() -> None:
    assert set(torch.nonzero(restrict(LOGITS, 1.0, 2).isfinite()).flatten().tolist()) == {0, 1}
    probs = torch.softmax(LOGITS, -1)
    # The smallest set reaching 0.8: the top three carry 0.524 + 0.193 + 0.117 = 0.834.
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    assert set(torch.nonzero(restrict(LOGITS, 0.8, 0).isfinite()).flatten().tolist()) == {0, 1, 2}
    assert set(torch.nonzero(restrict(LOGITS, 0.01, 0).isfinite()).flatten().tolist()) == {0}
    drawn = {seeded_token(LOGITS, 1.0, 0.8, 0, seed=s, position=0) for s in range(500)}
    assert drawn == {0, 1, 2}
    drawn = {seeded_token(LOGITS, 1.0, 1.0, 2, seed=s, position=0) for s in range(500)}
    assert drawn == {0, 1}


def test_auto_keeps_chunked_prefill_on_and_samples_seeds_itself_on_cpu() -> None:
    assert sampling_modes("auto", "auto", cpu=True) == (True, True)
    assert sampling_modes("auto", "auto", cpu=False) == (True, False)
    # vLLM's seeded path on a CPU cannot run with chunked prefill, so auto turns it off.
    assert sampling_modes("auto", "vllm", cpu=True) == (False, False)
    assert sampling_modes("on", "vllm", cpu=True) == (True, False)
    assert sampling_modes("off", "tuneloop", cpu=False) == (False, True)


def test_a_step_holds_a_whole_prompt_unless_prompts_are_chunked() -> None:
    assert batched_tokens(0, chunked=True, max_model_len=2048) is None  # vLLM's default
    assert batched_tokens(256, chunked=True, max_model_len=2048) == 256
    assert batched_tokens(256, chunked=False, max_model_len=2048) == 2048


def _delta(text: str, done: bool = False) -> EngineDelta:
    return EngineDelta(0, text, (1,), None, "stop" if done else None, "", None)


async def _stream(texts: list[str]) -> AsyncGenerator[EngineDelta, None]:
    for i, text in enumerate(texts):
        yield _delta(text, done=i == len(texts) - 1)


async def test_merged_candidates_keep_each_streams_order_under_its_index() -> None:
    merged = [d async for d in merge_candidates([_stream(["a", "b"]), _stream(["x", "y", "z"])])]
    by_index: dict[int, str] = {}
    for d in merged:
        by_index[d.index] = by_index.get(d.index, "") + d.text
    assert by_index == {0: "ab", 1: "xyz"}
    assert sum(d.finish_reason is not None for d in merged) == 2


async def test_an_error_in_one_candidate_ends_the_merge_and_closing_it_cancels_the_rest() -> None:
    cancelled = asyncio.Event()

    async def failing() -> AsyncGenerator[EngineDelta, None]:
        yield _delta("a")
        raise RuntimeError("engine refused")

    async def endless() -> AsyncGenerator[EngineDelta, None]:
        try:
            while True:
                yield _delta("x")
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(RuntimeError, match="engine refused"):
        async for _ in merge_candidates([failing(), endless()]):
            pass
    await asyncio.wait_for(cancelled.wait(), 5)

    cancelled.clear()
    merged = merge_candidates([endless(), endless()])
    await merged.__anext__()
    await merged.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)
