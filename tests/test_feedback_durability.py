"""An acknowledged event survives the server being SIGKILLed in the middle of a bulk load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from completion_factory import make_completion

from tuneloop.server.store import open_store
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

SERVER_SCRIPT = Path(__file__).with_name("feedback_server.py")
KILL_AFTER_ACKS = 3000
MAX_EVENTS = 200_000  # far more than get acknowledged before the kill


async def _start_server(url: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER_SCRIPT), url, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
    assert line.startswith("PORT "), f"server did not start: {line!r}"
    return proc, int(line.split()[1])


async def test_every_acknowledged_event_is_stored_after_sigkill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fb.db"
    store = open_store(url)
    targets = [make_completion(output=f"answer {i}") for i in range(8)]
    store.write_completions(targets)
    store.close()
    proc, port = await _start_server(url)

    async def events() -> AsyncIterator[fpb.FeedbackEvent]:
        for i in range(MAX_EVENTS):
            cid = targets[i % len(targets)].completion_id
            yield fpb.FeedbackEvent(
                event_id=f"ev-{i}", rater_id=f"rater-{i}", rating=fpb.RatingFeedback(completion_id=cid, score=1 + i % 5)
            )

    acked: list[str] = []
    killed_while_running = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = fpb_grpc.FeedbackServiceStub(channel).SubmitFeedbackStream(events())
            try:
                async for ack in stream:
                    assert not ack.HasField("error"), ack.error
                    acked.append(ack.event_id)
                    if len(acked) == KILL_AFTER_ACKS:
                        killed_while_running = proc.returncode is None
                        os.kill(proc.pid, signal.SIGKILL)  # acks already in flight keep arriving
            except grpc.aio.AioRpcError as err:
                # After the kill the call ends as UNAVAILABLE or CANCELLED, or as a local INTERNAL
                # when the client's next send hits the dead connection; before it, any error fails.
                dead = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
                assert killed_while_running and err.code() in dead, err
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    # The server was running when the SIGKILL went out, so that is how it died. (Its return code
    # is not checked: when another waiter in this test process reaps the child first, asyncio
    # reports 255 instead of -9.)
    assert killed_while_running
    assert len(acked) >= KILL_AFTER_ACKS

    store = open_store(url)
    stored = {r.event_id for r in store.iter_feedback()}
    store.close()
    missing = [e for e in acked if e not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert len(stored) < MAX_EVENTS, "the server must have died mid-load"
