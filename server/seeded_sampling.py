"""Seeded sampling that needs no random-generator state: the token at each position is a pure
function of (logits, sampling settings, seed, position).

Why tuneloop samples seeded requests itself: vLLM gives a seeded request its own
`torch.Generator` and, when a step's sample is thrown away (a prompt prefilled in chunks samples
once per chunk and keeps only the last), rewinds that generator with `set_offset`, which exists
only for CUDA generators. On the CPU build that kills the engine core ("CPU Generator does not use
offset"), so before this module chunked prefill had to be off on CPU, which tripled the time to
first token under a burst. Here the noise for position `t` comes from a generator seeded with
`mix(seed, t)`: a discarded sample leaves nothing to rewind, and the sampler adds no dependence
on what else is in the batch. The logits themselves are batch-invariant only where the CPU's
kernels are: on AVX-512 without AMX, two identical seeded requests batched together wrote the same
text; on a Xeon with AMX, a row's logits change slightly with what else is in the batch (the bf16
kernels there are not batch-invariant), and a sample at temperature 1, which often lands in the
distribution's long tail of tiny probabilities, follows them from the first few tokens on. A
seed reproduces a request's text when it runs alone, or beside the same company.

The sample is drawn by inverting the cumulative distribution of softmax(logits / T), restricted
to the top-k / top-p set as vLLM does, at one uniform number u = mix(seed, t) / 2^64: one hash
instead of a vocabulary's worth of random numbers (~60 µs a row on a 49k vocabulary, against
~800 µs for exponential noise from a seeded torch generator), so seeded requests stay as fast as
unseeded ones.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# Where a seeded request's real settings ride (SamplingParams.extra_args) to the sampler that vLLM
# loads by name in its worker (engine.SEEDED_SAMPLER).
EXTRA_KEY = "tuneloop_seeded"


def seeded_extra_args(seed: int, temperature: float, top_p: float, top_k: int, start: int = 0) -> dict[str, object]:
    """What a seeded request carries in `SamplingParams.extra_args` for the sampler. `start` is
    the output position of its first token: > 0 for a request resumed with its earlier output
    appended to the prompt (server/fast_path.py), so it samples what it would have sampled."""
    spec = {"seed": seed, "temperature": temperature, "top_p": top_p, "top_k": top_k, "start": start}
    return {EXTRA_KEY: spec}


def mix(seed: int, position: int) -> int:
    """A 64-bit generator seed for (request seed, output position): SplitMix64 of both, so
    neighbouring seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def restrict(scaled: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the top-k, then outside the top-p nucleus, as vLLM's
    sampler does: k largest logits, then the smallest set whose probability reaches `top_p`.

    scaled: [vocab] float32 logits already divided by the temperature. Returns a new tensor.
    """
    out = scaled
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        # The nucleus is usually a few dozen tokens: take the most likely ones in growing
        # batches instead of sorting the whole vocabulary (~1 ms a row for 49k tokens).
        probs = out.softmax(-1)
        k = 64
        while True:
            top, order = probs.topk(min(k, probs.numel()))
            if float(top.sum()) >= top_p or k >= probs.numel():
                break
            k *= 8
        # Keep each token while the mass before it is still below top_p.
        count = int(torch.searchsorted(top.cumsum(0), torch.tensor([top_p], dtype=top.dtype, device=top.device)))
        keep = torch.full_like(out, float("-inf"))
        kept = order[: count + 1]
        keep[kept] = out[kept]
        out = keep
    return out


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1), uniform over seeds, fixed for (seed, position): 53 bits of mix()."""
    return (mix(seed, position) >> 11) * 2.0**-53


def seeded_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int, position: int) -> int:
    """The token a seeded request samples at output `position`.

    logits: [vocab] raw next-token logits (any float dtype, any device).
    temperature > 0; top_p in (0, 1]; top_k 0 (all tokens) or the number kept.
    """
    scaled = restrict(logits.float() / temperature, top_p, top_k)
    # float64 running sum: over 49k tokens a float32 one drifts by ~1e-4 of the total.
    cdf = torch.softmax(scaled, -1).double().cumsum(0)
    point = torch.tensor([uniform(seed, position) * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    # right=True: the first token whose cumulative mass exceeds the point, never a masked one.
    return min(int(torch.searchsorted(cdf, point, right=True)), cdf.numel() - 1)
