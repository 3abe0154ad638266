"""What tuneloop adds to vLLM's worker process.

vLLM imports this module in each of its workers, by the name `engine.WORKER_EXTENSION` (engine
argument `worker_extension_cls`), before it builds the model: the one place tuneloop's code runs
there early enough to choose the CPU LoRA kernels (`vllm_cpu_lora.py`), and the class whose
methods the server calls through `AsyncLLM.collective_rpc` (the weight fold, `vllm_fold.py`).
"""

from __future__ import annotations

import gc

from vllm.utils.gc_utils import freeze_gc_heap

from .allocator import loaded_allocator
from .vllm_cpu_lora import use_grouped_lora_kernels
from .vllm_fold import FoldWorkerExtension

use_grouped_lora_kernels()


class WorkerExtension(FoldWorkerExtension):
    """Mixed into vLLM's worker class; its methods carry a `tuneloop_` prefix."""

    def tuneloop_freeze_heap(self) -> None:
        """Called once the engine serves: move everything the start-up left alive (the model's
        modules and parameters, vLLM's and torch's own) out of the garbage collector's reach, as
        vLLM's GPU worker does after its warm-up and its CPU worker does not. Unfrozen, each full
        collection walked them all, ~290 ms about once a minute, with every request waiting."""
        freeze_gc_heap()

    def tuneloop_state(self) -> dict[str, object]:
        """What the server logs at start: the malloc this worker runs with (allocator.py) and the
        objects its collector no longer walks."""
        return {"allocator": loaded_allocator(), "frozen_objects": gc.get_freeze_count()}
