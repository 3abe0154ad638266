"""The logits processor that runs tuneloop's seeded sampling inside vLLM's worker.

vLLM loads it by name (`engine.SEEDED_SAMPLER`, passed as `logits_processors`) in the worker process, so
this module is imported there: keep it free of server state. The math lives in
`seeded_sampling.py`; this class only tracks which rows of vLLM's persistent batch are seeded.

A seeded request reaches vLLM without a seed (so vLLM never creates the per-request generator it
would rewind with a CUDA-only call) and with temperature 1, top-p 1 and top-k 0; its real settings
ride in `SamplingParams.extra_args[EXTRA_KEY]`. Here the row's token is chosen and every other
logit set to -inf, so vLLM's own sampler, greedy or random, can only pick that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .seeded_sampling import EXTRA_KEY, seeded_token


@dataclass(frozen=True)
class _Row:
    seed: int
    temperature: float
    top_p: float
    top_k: int
    start: int  # output position of the request's first token (> 0 once resumed)
    output_ids: list[int]  # vLLM's live list of the request's generated tokens


class SeededSampler(LogitsProcessor):
    """Chooses the next token of every seeded row with `seeded_token`."""

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        # It decides the token, so greedy rows in the same batch must not skip it.
        return False

    @staticmethod
    def _row(params: SamplingParams, _prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
        spec = (params.extra_args or {}).get(EXTRA_KEY)
        if spec is None:
            return None
        return _Row(
            int(spec["seed"]), float(spec["temperature"]), float(spec["top_p"]), int(spec["top_k"]),
            int(spec["start"]), output_ids,
        )  # fmt: skip

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self._rows.items():
            # The position is the number of tokens generated so far: a chunk of a prompt that is
            # still being prefilled samples at the same position as the chunk that finishes it,
            # and its sample is discarded, so no state has to be rewound.
            position = row.start + len(row.output_ids)
            token = seeded_token(logits[index], row.temperature, row.top_p, row.top_k, row.seed, position)
            logits[index].fill_(float("-inf"))
            logits[index, token] = 0.0
        return logits
