"""A gRPC server hosting only the FeedbackService over a real store (feedback needs no engine).

Imported by the feedback tests (`feedback_server()` runs one in the test's event loop), and run
as a separate process by the SIGKILL durability test and by bench/feedback_ingest.py:

    python tests/feedback_server.py sqlite:////tmp/x.db   # prints "PORT <n>", serves until SIGTERM
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.heap import freeze_startup_heap
from tuneloop.server.metrics import Metrics
from tuneloop.server.servicers.feedback import FeedbackServicer
from tuneloop.server.store import Store, open_store
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc


@asynccontextmanager
async def feedback_server(store: Store, metrics: Metrics | None = None) -> AsyncIterator[tuple[int, FeedbackService]]:
    """Serves feedback on 127.0.0.1:<free port>; yields (port, service). Drains on exit."""
    metrics = metrics or Metrics()
    service = FeedbackService(store, metrics)
    service.start()
    server = grpc.aio.server()
    fpb_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(service, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, service
    finally:
        await server.stop(grace=1.0)
        await service.close()


async def _main(url: str) -> None:
    store = open_store(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with feedback_server(store) as (port, _service):
        freeze_startup_heap()  # as the server does once ready
        print(f"PORT {port}", flush=True)
        await stop.wait()
    store.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
