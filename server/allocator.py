"""The memory allocator of vLLM's CPU processes: tcmalloc where the host has it.

vLLM's CPU worker allocates and frees activations of a new size at nearly every step (each batch
has its own token count). In the 10-minute soak of 64 streams (bench/soak.py) on a 2-core Xeon,
with glibc's malloc the p99 time to first token per minute was 0.50-2.28 s, 652-780 requests a
minute were served and 217 first tokens took over 1 s; with tcmalloc 0.56-0.94 s, 723-897 a
minute and 82. The worker's memory grew about as much with either (+4.9% from minute 2 with
glibc, +4.7-5.1% with tcmalloc). vLLM's own CPU build preloads a tcmalloc it bundles into its
wheel (`vllm/libs`) and warns when it is missing; the wheel tuneloop installs bundles none, so
tuneloop preloads the host's (`libtcmalloc-minimal4`, a Debian package `deploy/install.sh`
installs) the same way: through `LD_PRELOAD`, set before vLLM spawns its engine core and workers,
which inherit it. The server process itself keeps the allocator it started with.

An allocator the user already preloads (tcmalloc, jemalloc, mimalloc) is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # ctypes.util names, first found wins
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def preloaded_allocator(ld_preload: str) -> str | None:
    """The allocator `ld_preload` (LD_PRELOAD's value) names, if any."""
    return next((name for name in _ALLOCATORS if name in ld_preload), None)


def with_preloaded(ld_preload: str, library: str) -> str:
    """`ld_preload` with `library` first, unless it already names an allocator."""
    if preloaded_allocator(ld_preload):
        return ld_preload
    return ":".join([library, *(e for e in ld_preload.replace(" ", ":").split(":") if e)])


def find_tcmalloc() -> str | None:
    """The host's tcmalloc as the dynamic loader names it ("libtcmalloc_minimal.so.4"), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_tcmalloc_for_children() -> None:
    """Set LD_PRELOAD so that processes started from now on run with tcmalloc, unless it already
    names an allocator; warns when the host has no tcmalloc. (Each worker reports what it got:
    `loaded_allocator`.)"""
    current = os.environ.get("LD_PRELOAD", "")
    if preloaded_allocator(current):
        return
    library = find_tcmalloc()
    if library is None:
        log.warning(
            "tcmalloc not found: vLLM's CPU worker runs with glibc's malloc, slower under steady load "
            "(install Debian's libtcmalloc-minimal4, or run deploy/install.sh as root)"
        )
        return
    os.environ["LD_PRELOAD"] = with_preloaded(current, library)


def loaded_allocator(maps: str | None = None) -> str:
    """Which allocator this process runs with, from its memory map (/proc/self/maps)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux
            return "unknown"
    return next((name for name in _ALLOCATORS if f"lib{name}" in maps), "glibc")


def release_free_memory() -> None:
    """Collect Python's garbage, then hand the allocator's free pages back to the system: after a
    large transient (a weight fold streams a checkpoint through the process), an allocator keeps
    the freed memory for later allocations and the process's resident size stays up."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    process = ctypes.CDLL(None)  # the symbols of everything loaded, preloaded libraries first
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)  # tcmalloc's C API
    if release is not None:
        release()
        return
    trim = getattr(process, "malloc_trim", None)  # glibc; musl has none: nothing to trim
    if trim is not None:
        trim(0)
