"""A minute without the store, under load: the server keeps serving on the real engine, memory
stays bounded (served completions spill to the local journal, not to a queue in memory), and
when the store answers again every completion lands in it once, and feedback on one works.

The store is a real PostgreSQL server behind a loopback TCP proxy whose link the test cuts: the
outage is a network partition, with nothing in between pretending to be the database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from tuneloop.server.store import open_store
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

OUTAGE_S = 60.0
CLIENTS = 4


@pytest.mark.engine
async def test_a_minute_without_the_store_loses_no_completion(make_server, postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    direct = make_url(postgres.create_database())
    proxy = TcpProxy(direct.host or "127.0.0.1", direct.port or 5432)
    via_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    server = await make_server(store_url=via_proxy, journal_dir=str(tmp_path / "journal"))
    sample = server.metrics.registry.get_sample_value
    ids: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            gen = pb_grpc.GenerationServiceStub(ch)

            async def generate() -> None:
                r = await gen.Generate(pb.GenerateRequest(prompt="Say hi.", sampling=pb.SamplingParams(max_tokens=2)))
                ids.append(r.completions[0].completion_id)

            await generate()
            assert server.completion_log.flush(10)

            proxy.cut()
            end = time.monotonic() + OUTAGE_S
            peak_queue = 0.0

            async def client() -> None:
                nonlocal peak_queue
                while time.monotonic() < end:
                    await generate()  # any failure here fails the test: serving must go on
                    peak_queue = max(peak_queue, sample("tuneloop_completion_log_queue_depth") or 0.0)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            served_in_outage = len(ids) - 1
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert server.completion_log.spilling
            journaled = sample("tuneloop_completion_log_journal_records") or 0.0
            assert served_in_outage > 50 and journaled >= served_in_outage - peak_queue
            # Bounded: at most what arrives while the first failed write times out and one batch is
            # appended, never the outage's worth (a loaded CI host saw 1,332 of 2,902 queued once).
            assert peak_queue < served_in_outage / 2, (peak_queue, served_in_outage)
            assert (tmp_path / "journal" / "records.jsonl").stat().st_size > 0

            proxy.restore()
            assert await asyncio.to_thread(server.completion_log.flush, 120), "the journal was not replayed"
            assert not server.completion_log.spilling
            assert sample("tuneloop_completion_log_journal_records") == 0
            assert not (tmp_path / "journal" / "records.jsonl").exists()

            store = open_store(direct.render_as_string(hide_password=False))
            try:
                assert len(set(ids)) == len(ids)
                assert store.count_completions() == len(ids)  # each exactly once
                assert set(store.get_completions(ids)) == set(ids)
            finally:
                store.close()
            # Feedback on a completion served mid-outage is accepted now.
            ack = await fpb_grpc.FeedbackServiceStub(ch).SubmitFeedback(
                fpb.FeedbackEvent(
                    event_id="after-outage", rater_id="r1",
                    thumbs=fpb.ThumbsFeedback(completion_id=ids[len(ids) // 2], value=fpb.THUMB_UP),
                )  # fmt: skip
            )
            assert ack.event_id == "after-outage"
    finally:
        proxy.close()


@pytest.mark.engine
async def test_durable_completions_are_in_the_store_before_the_answer(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/durable.db"
    # Without the mode a record waits out the batch window (50 ms) after its answer has gone.
    server = await make_server(store_url=url, durable_completions=True)
    store = open_store(url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            gen = pb_grpc.GenerationServiceStub(ch)
            for i in range(3):
                r = await gen.Generate(
                    pb.GenerateRequest(prompt=f"Count to {i}.", sampling=pb.SamplingParams(max_tokens=2, n=2))
                )
                for c in r.completions:  # read by another connection the moment the answer arrives
                    assert store.get_completion(c.completion_id) is not None, (i, c.completion_id)
    finally:
        store.close()
