"""Folding a LoRA adapter into the base weights inside vLLM's worker process.

vLLM mixes `FoldWorkerExtension` into its worker class (through `vllm_worker.WorkerExtension`),
and the server calls its method through `AsyncLLM.collective_rpc`.

Why a reload and not an in-place add: the CPU backend repacks each linear weight into a oneDNN
handle after loading and drops the original tensor, so there is nothing to add to. vLLM's
in-place reload streams checkpoint-format weights through the model's own `load_weights`
(fusing q/k/v into qkv_proj and so on) and repacks each layer it is given again; a layer it is
given nothing for keeps its current (kernel-format) weights. So a fold streams only the blocks
whose weights change (the new version's modules and the ones the previous fold changed), from
the base checkpoint, with the adapter's update added. Every LoRA the worker had loaded is
dropped by the reload (vLLM reloads them from their files on next use).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

import torch

from .allocator import release_free_memory
from .lora_algebra import Lora, read_lora

# vLLM warns about every layer and weight a reload is not given; a fold leaves them out on purpose.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
)


class FoldWorkerExtension:
    """Methods added to vLLM's worker; names carry a prefix so they never shadow vLLM's own."""

    model_runner: object
    vllm_config: object
    # Checkpoint weight names the served weights may differ from the base in (the last fold's
    # blocks; after a failed fold, every block it may have touched).
    _tuneloop_changed: frozenset[str] = frozenset()

    def tuneloop_fold(self, adapter_path: str | None) -> dict[str, object]:
        """Make the served weights base + the adapter at `adapter_path` (the bare base for None).
        Returns what was done, for the server's log; raises when the adapter names a weight the
        checkpoint does not have."""
        started = time.perf_counter()
        lora = read_lora(adapter_path) if adapter_path else None
        updates = _updates(lora) if lora is not None else {}
        scale = lora.scale if lora is not None else 0.0
        blocks = {_block(name) for name in set(updates) | set(self._tuneloop_changed)}
        # Until the reload has finished, any of these blocks may hold either version: a restore
        # after a failure must reload all of them.
        self._tuneloop_changed = frozenset(self._tuneloop_changed | set(updates))
        pending = dict(updates)
        streamed = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal streamed
            for name, tensor in self._tuneloop_checkpoint():
                if _block(name) not in blocks:
                    continue  # unchanged: the layer keeps the weights it serves with now
                factors = pending.pop(name, None)
                if factors is not None:
                    # One weight's update at a time: a model's worth of dense float32 updates
                    # at once was a transient the allocator kept after the fold.
                    a, b = factors
                    tensor = (tensor.float() + scale * (b @ a)).to(tensor.dtype)
                streamed += 1
                yield name, tensor

        if blocks:
            with _quiet(_RELOAD_LOGGERS):
                self.model_runner.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        changed = frozenset(updates)
        # The reload freed the replaced layers' weights and the streamed checkpoint tensors.
        release_free_memory()
        gc.freeze()  # the reloaded layers join the start-up heap the collector skips (vllm_worker.py)
        if pending:
            raise ValueError(f"the adapter updates weights the base checkpoint does not have: {sorted(pending)[:4]}")
        self._tuneloop_changed = changed
        return {
            "weights_changed": len(changed),
            "weights_reloaded": streamed,
            "seconds": time.perf_counter() - started,
        }

    def _tuneloop_checkpoint(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The base checkpoint's weights by name, streamed from disk as vLLM loaded them."""
        from vllm.model_executor.model_loader import get_model_loader  # noqa: PLC0415 - worker-only

        runner = self.model_runner
        loader = get_model_loader(self.vllm_config.load_config)  # type: ignore[attr-defined]
        return loader.get_all_weights(runner.model_config, runner.get_model())  # type: ignore[attr-defined]


def _updates(lora: Lora) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's factors (A, B) by the checkpoint name of the weight they update."""
    return {f"{module}.weight": factors for module, factors in lora.factors.items()}


def _block(weight_name: str) -> str:
    """The module whose projections vLLM may fuse into one layer ("model.layers.3.self_attn" for
    its q/k/v/o_proj weights): vLLM fuses only sibling projections (q/k/v into qkv_proj, gate/up
    into gate_up_proj), and a fused layer must be given all its parts or it is left part-loaded."""
    return weight_name.rsplit(".", 2)[0]


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The named loggers at ERROR for the duration of a `with` block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
