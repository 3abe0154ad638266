"""Folding a LoRA adapter into the base weights inside vLLM's worker process.

vLLM mixes `FoldWorkerExtension` into its worker class (engine argument `worker_extension_cls`,
by name: `engine.FOLD_EXTENSION`), and the server calls its method through `AsyncLLM.collective_rpc`.

Why a reload and not an in-place add: the CPU backend repacks each linear weight into a oneDNN
handle after loading and drops the original tensor, so there is nothing to add to. vLLM's
in-place reload streams checkpoint-format weights through the model's own `load_weights`
(fusing q/k/v into qkv_proj and so on) and repacks each layer again, so the base checkpoint is
streamed from disk with the adapter's update added to the weights it touches. Every LoRA the
worker had loaded is dropped by the reload (vLLM reloads them from their files on next use).
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Iterator

import torch

from .lora_algebra import read_lora, weight_deltas


class FoldWorkerExtension:
    """Methods added to vLLM's worker; names carry a prefix so they never shadow vLLM's own."""

    model_runner: object
    vllm_config: object

    def tuneloop_fold(self, adapter_path: str | None) -> dict[str, object]:
        """Make the served weights base + the adapter at `adapter_path` (the bare base for None).
        Returns what was done, for the server's log; raises when the adapter names a weight the
        checkpoint does not have."""
        from vllm.model_executor.model_loader import get_model_loader  # noqa: PLC0415 - worker-only

        started = time.perf_counter()
        deltas = weight_deltas(read_lora(adapter_path)) if adapter_path else {}
        runner = self.model_runner
        model_config = runner.model_config  # type: ignore[attr-defined]
        model = runner.get_model()  # type: ignore[attr-defined]
        loader = get_model_loader(self.vllm_config.load_config)  # type: ignore[attr-defined]
        pending = dict(deltas)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in loader.get_all_weights(model_config, model):  # type: ignore[attr-defined]
                delta = pending.pop(name, None)
                if delta is not None:
                    tensor = (tensor.float() + delta).to(tensor.dtype)
                yield name, tensor

        runner.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        _return_freed_memory()
        if pending:
            raise ValueError(f"the adapter updates weights the base checkpoint does not have: {sorted(pending)[:4]}")
        return {"weights_changed": len(deltas), "seconds": time.perf_counter() - started}


def _return_freed_memory() -> None:
    """A reload frees a model's worth of tensors (the old weights, the streamed checkpoint) that
    glibc keeps in its arenas; hand them back so the worker's resident size stays flat across
    publishes (the soak bench saw +300 MiB after the first fold without this)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
