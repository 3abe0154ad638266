"""What tuneloop adds to vLLM's worker process.

vLLM imports this module in each of its workers, by the name `engine.WORKER_EXTENSION` (engine
argument `worker_extension_cls`), before it builds the model: the one place tuneloop's code runs
there early enough to choose the CPU LoRA kernels (`vllm_cpu_lora.py`), and the class whose
methods the server calls through `AsyncLLM.collective_rpc` (the weight fold, `vllm_fold.py`).
"""

from __future__ import annotations

from .allocator import loaded_allocator
from .vllm_cpu_lora import use_grouped_lora_kernels
from .vllm_fold import FoldWorkerExtension

use_grouped_lora_kernels()


class WorkerExtension(FoldWorkerExtension):
    """Mixed into vLLM's worker class; its methods carry a `tuneloop_` prefix."""

    def tuneloop_allocator(self) -> str:
        """The malloc this worker runs with ("tcmalloc", "glibc", ...; allocator.py), for the log."""
        return loaded_allocator()
