"""Which weights dtype is fastest on this host: one decision for the server, the trainer, benches, tests.

bf16 halves memory traffic but only pays where the hardware has bf16 math (AVX512-BF16/AMX on
x86, Ampere+ on CUDA). On an AVX2-only CPU it is emulated: SmolLM2 served 25 tokens/s in bf16
against 77 in float32 on a Zen 3 host, so "auto" must look at the hardware, not at the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def bf16_math(device_type: str) -> bool:
    """True where `device_type` ("cpu" or "cuda") computes bf16 natively rather than emulating it."""
    import torch  # noqa: PLC0415 - torch is heavy; only the callers that decide a dtype pay for it

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def fastest_dtype(
    preference: str, device_type: str = "cpu", bf16_probe: Callable[[str], bool] = bf16_math
) -> str:
    """Resolve a dtype preference ("auto" or one of DTYPE_NAMES) to a dtype name for `device_type`.

    "auto" picks bfloat16 where `bf16_probe(device_type)` says the math is native; otherwise
    float32 on CPU (float16 has no fast CPU kernels either) and float16 on a CUDA device
    without bf16 (pre-Ampere GPUs have fast fp16). An explicit name is returned unchanged.
    """
    if preference in DTYPE_NAMES:
        return preference
    if preference != "auto":
        raise ValueError(f"dtype must be auto or one of {DTYPE_NAMES}, got {preference!r}")
    if bf16_probe(device_type):
        return "bfloat16"
    return "float16" if device_type == "cuda" else "float32"
