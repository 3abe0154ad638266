"""Seeded sampling that needs no random-generator state: the token at each position is a pure
function of (logits, sampling settings, seed, position).

Why tuneloop samples seeded requests itself: vLLM gives a seeded request its own
`torch.Generator` and, when a step's sample is thrown away (a prompt prefilled in chunks samples
once per chunk and keeps only the last), rewinds that generator with `set_offset`, which exists
only for CUDA generators. On the CPU build that kills the engine core ("CPU Generator does not use
offset"), so before this module chunked prefill had to be off on CPU, which tripled the time to
first token under a burst. Here the noise for position `t` comes from a generator seeded with
`mix(seed, t)`: a discarded sample leaves nothing to rewind, and the text depends only on the
seed, never on what else was in the batch.

The sample is drawn with the Gumbel-max trick: argmax(logits / T + G), G ~ Gumbel(0, 1) i.i.d.,
is distributed as softmax(logits / T), restricted here to the top-k / top-p set as vLLM does.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# How the engine finds the vLLM side of this (a logits processor loaded by name in vLLM's worker)
# and where a seeded request's real settings ride (SamplingParams.extra_args).
SEEDED_SAMPLER = "tuneloop.server.vllm_sampling:SeededSampler"
EXTRA_KEY = "tuneloop_seeded"


def seeded_extra_args(seed: int, temperature: float, top_p: float, top_k: int) -> dict[str, object]:
    """What a seeded request carries in `SamplingParams.extra_args` for the sampler."""
    return {EXTRA_KEY: {"seed": seed, "temperature": temperature, "top_p": top_p, "top_k": top_k}}


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
        ascending, order = out.sort()
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1.0 - top_p
        drop[-1] = False  # the most likely token always stays
        out = out.clone()
        out[order[drop]] = float("-inf")
    return out


def seeded_token(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int, position: int
) -> int:
    """The token a seeded request samples at output `position`.

    logits: [vocab] raw next-token logits (any float dtype, any device).
    temperature > 0; top_p in (0, 1]; top_k 0 (all tokens) or the number kept.
    """
    scaled = restrict(logits.float() / temperature, top_p, top_k)
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(mix(seed, position))
    # -log(E), E ~ Exp(1), is Gumbel(0, 1).
    noise = torch.empty_like(scaled).exponential_(generator=gen).log_()
    return int((scaled - noise).argmax())
