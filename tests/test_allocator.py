"""vLLM's CPU processes allocate with tcmalloc (server/allocator.py): the LD_PRELOAD the server sets
for them; and on the real engine, the allocator its worker runs with and its frozen start-up heap
(server/vllm_worker.py)."""

from __future__ import annotations

import pytest

from tuneloop.server.allocator import find_tcmalloc, loaded_allocator, with_preloaded

TCMALLOC = "libtcmalloc_minimal.so.4"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", TCMALLOC),
        ("/torch/lib/libgomp.so.1", f"{TCMALLOC}:/torch/lib/libgomp.so.1"),
        ("a.so b.so", f"{TCMALLOC}:a.so:b.so"),  # ld.so also splits LD_PRELOAD on spaces
        ("/opt/lib/libjemalloc.so.2", "/opt/lib/libjemalloc.so.2"),  # the user's allocator stays
        (f"/usr/lib/{TCMALLOC}:/x/libgomp.so", f"/usr/lib/{TCMALLOC}:/x/libgomp.so"),  # already there
    ],
)
def test_tcmalloc_goes_first_unless_an_allocator_is_preloaded(before: str, after: str) -> None:
    assert with_preloaded(before, TCMALLOC) == after


def test_the_allocator_is_read_from_the_memory_map() -> None:
    glibc = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert loaded_allocator(glibc) == "glibc"
    assert loaded_allocator(glibc + f"7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/{TCMALLOC}\n") == "tcmalloc"


def test_the_host_has_tcmalloc() -> None:
    """deploy/install.sh installs it (Debian's libtcmalloc-minimal4)."""
    assert find_tcmalloc() is not None, "install Debian's libtcmalloc-minimal4"


async def test_the_engines_worker_allocates_with_tcmalloc_and_its_start_up_heap_is_frozen(engine) -> None:
    [state] = await engine.worker_states()
    assert state["allocator"] == "tcmalloc"
    assert state["frozen_objects"] > 10_000  # the model's modules and parameters, torch's, vLLM's
