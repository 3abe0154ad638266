"""The interpreter heap of a long-running process: what it holds once started stays out of the way.

Python's cyclic garbage collector walks every tracked object of a generation when it collects it,
and a started server holds a few hundred thousand (gRPC, SQLAlchemy, protobuf, and with vLLM
torch and transformers: millions) that live as long as the process. Requests allocate fast (a
feedback batch of 1,000 events makes tens of thousands of objects), so the oldest generation is
collected now and then, and each time the whole startup heap is walked again while the event loop
and the writer threads wait for the GIL. `gc.freeze()` moves everything alive at that moment into
a permanent generation that collections skip; what requests allocate later is collected as before.

At exit the heap is thawed again, so that the interpreter's last collection frees it as it would
have (extension modules such as triton's nanobind bindings report every object still alive then
as a leak).
"""

from __future__ import annotations

import atexit
import gc
import logging
import time

log = logging.getLogger(__name__)
_thaw_at_exit = False  # gc.unfreeze registered with atexit


def freeze_startup_heap() -> None:
    """Collects the garbage of the start-up, then freezes what is left (call when ready to serve)."""
    global _thaw_at_exit
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    if not _thaw_at_exit:
        atexit.register(gc.unfreeze)
        _thaw_at_exit = True
    log.debug("froze %d start-up objects in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)
