"""Feedback ingestion throughput, acknowledged after commit, against a plain SQLite insert loop.

Runs the feedback-only gRPC server (tests/feedback_server.py) in its own process over a fresh
SQLite store, then measures from this process:
  1. bulk:   N events as SubmitFeedbackBatch calls of 500 from 4 concurrent clients (one channel
     each, one call at a time), first send to last ack
  2. stream: one SubmitFeedbackStream of N events, first send to last ack (goal >= 5,000/s)
  3. unary:  SubmitFeedback from 32 concurrent clients, one channel each   (goal >= 1,000/s)
  4. echo: the same stream and batches against a server that answers each event at once and
     stores nothing (`--echo-server`, its own process too): gRPC's cost alone, so the most any
     server can reach with each protocol on the host.
  5. baselines on the same rows with sqlite3 directly (WAL, synchronous=FULL):
     a commit per row (what per-event durable acks cost without group commit) and one
     transaction for all rows (no validation, no RPC; run right before and after the bulk
     batches and the stream and once more at the end, the median is the figure).

    python bench/feedback_ingest.py [--bulk-events 20000] [--batch-size 500] [--batch-clients 4]
                                    [--clients 32] [--per-client 100]

`feedback_bulk_vs_raw_sqlite` is bulk (batch) events/s over the one-transaction rows/s of the same
run, `feedback_stream_vs_raw_sqlite` the same for the stream. The last line is
`feedback_bulk_events_per_s: X` (the batch figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from tuneloop.server.domain import CompletionRecord, new_id
from tuneloop.server.feedback import FeedbackEvent
from tuneloop.server.store import open_store, prompt_sha256
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "feedback_server.py"
RATERS = 500


class EchoFeedback(fpb_grpc.FeedbackServiceServicer):
    """Acks each streamed event as it arrives, storing nothing: gRPC's share of a bulk stream."""

    async def SubmitFeedbackStream(
        self, request_iterator: AsyncIterator[fpb.FeedbackEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fpb.FeedbackAck]:
        index = 0
        async for msg in request_iterator:
            yield fpb.FeedbackAck(event_id=msg.event_id, sequence=index + 1, stream_index=index)
            index += 1

    async def SubmitFeedbackBatch(
        self, request: fpb.SubmitFeedbackBatchRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SubmitFeedbackBatchResponse:
        response = fpb.SubmitFeedbackBatchResponse()
        response.acks.extend(
            fpb.FeedbackAck(event_id=e.event_id, sequence=i + 1, stream_index=i) for i, e in enumerate(request.events)
        )
        return response


async def serve_echo() -> None:
    """Runs EchoFeedback on a free port; prints "PORT <n>" like tests/feedback_server.py, serves until SIGTERM."""
    server = grpc.aio.server()
    fpb_grpc.add_FeedbackServiceServicer_to_server(EchoFeedback(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def seed_completions(url: str, n: int = 64) -> list[CompletionRecord]:
    records = [
        CompletionRecord(
            completion_id=new_id("cmpl"), group_id="", request_id=new_id("req"), candidate_index=0,
            request={"input": {"prompt": f"prompt {i % 16}"}}, prompt_text=f"prompt {i % 16}", prompt_token_count=3,
            output_text=f"answer {i}", output_token_ids=[1, 2, 3], output_logprobs=None, finish_reason="stop",
            sampling={"n": 1}, adapter_name="base", adapter_version="base", user_id="u", session_id="s", tags={},
            queue_s=0.0, time_to_first_token_s=0.0, total_s=0.0, created_at=time.time(),
        )
        for i in range(n)
    ]  # fmt: skip
    store = open_store(url)
    store.write_completions(records)
    store.close()
    return records


def make_events(prefix: str, n: int, completions: list[CompletionRecord]) -> list[fpb.FeedbackEvent]:
    """Alternating thumbs and ratings from 500 raters, some with a comment and reason tags."""
    out = []
    for i in range(n):
        cid = completions[i % len(completions)].completion_id
        common = dict(event_id=f"{prefix}-{i}", rater_id=f"rater-{i % RATERS}")
        if i % 4 == 0:
            common.update(comment_text="too long, but correct", reason_tags=["verbose"])
        if i % 2:
            out.append(fpb.FeedbackEvent(rating=fpb.RatingFeedback(completion_id=cid, score=1 + i % 5), **common))
        else:
            value = fpb.THUMB_UP if i % 3 else fpb.THUMB_DOWN
            out.append(fpb.FeedbackEvent(thumbs=fpb.ThumbsFeedback(completion_id=cid, value=value), **common))
    return out


async def bench_batches(port: int, events: list[fpb.FeedbackEvent], batch_size: int, clients: int) -> float:
    """Events split among `clients` (a contiguous share each), each sending its share as batch calls
    one after another; events/s from the first send to the last ack."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [fpb_grpc.FeedbackServiceStub(ch) for ch in channels]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    share = -(-len(events) // clients)
    requests = [
        [fpb.SubmitFeedbackBatchRequest(events=events[j : min(j + batch_size, i + share)])
         for j in range(i, min(i + share, len(events)), batch_size)]
        for i in range(0, len(events), share)
    ]  # fmt: skip

    async def client(stub: fpb_grpc.FeedbackServiceStub, batches: list[fpb.SubmitFeedbackBatchRequest]) -> int:
        acked = 0
        for batch in batches:
            response = await stub.SubmitFeedbackBatch(batch)
            errors = [a.error.message for a in response.acks if a.HasField("error")]
            assert len(response.acks) == len(batch.events) and not errors, errors[:3]
            acked += len(response.acks)
        return acked

    t0 = time.perf_counter()
    acked = await asyncio.gather(*(client(s, b) for s, b in zip(stubs, requests, strict=False)))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(ch.close() for ch in channels))
    assert sum(acked) == len(events)
    return len(events) / elapsed


async def bench_stream(stub: fpb_grpc.FeedbackServiceStub, events: list[fpb.FeedbackEvent]) -> float:
    t0 = time.perf_counter()
    acks = [a async for a in stub.SubmitFeedbackStream(iter(events))]
    elapsed = time.perf_counter() - t0
    errors = [a.error.message for a in acks if a.HasField("error")]
    assert len(acks) == len(events) and not errors, errors[:3]
    return len(events) / elapsed


async def bench_unary(port: int, per_client: list[list[fpb.FeedbackEvent]]) -> float:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in per_client]
    stubs = [fpb_grpc.FeedbackServiceStub(ch) for ch in channels]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))

    async def client(stub: fpb_grpc.FeedbackServiceStub, events: list[fpb.FeedbackEvent]) -> None:
        for e in events:
            await stub.SubmitFeedback(e)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(s, evs) for s, evs in zip(stubs, per_client, strict=True)))
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*(ch.close() for ch in channels))
    return sum(map(len, per_client)) / elapsed


def baseline_rows(events: list[fpb.FeedbackEvent], completions: list[CompletionRecord]) -> list[tuple]:
    sha = {c.completion_id: prompt_sha256(c.prompt_text) for c in completions}
    rows = []
    for msg in events:
        e = FeedbackEvent.from_pb(msg)
        thumb = None if e.thumb_up is None else int(e.thumb_up)
        rows.append((e.event_id, e.content_sha256, e.rater_id, e.kind, e.completion_id, sha[e.completion_id],
                     thumb, e.rating, e.comment_text, json.dumps(list(e.reason_tags)), time.time()))  # fmt: skip
    return rows


def bench_sqlite(db: Path, rows: list[tuple], commit_each: bool) -> float:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    sql = (
        "INSERT INTO feedback (event_id, content_sha256, rater_id, kind, completion_id, group_id, prompt_sha256,"
        " thumb_up, rating, comment_text, reason_tags, created_at) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)"
    )
    t0 = time.perf_counter()
    if commit_each:
        for row in rows:
            conn.execute("BEGIN")
            conn.execute(sql, row)
            conn.execute("COMMIT")
    else:
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return len(rows) / elapsed


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    url = f"sqlite:///{tmp}/served.db"
    completions = seed_completions(url)
    base_url = f"sqlite:///{tmp}/baseline.db"
    base_completions = seed_completions(base_url)
    rows = baseline_rows(make_events("base", args.bulk_events, base_completions), base_completions)
    one_tx_runs: list[float] = []

    def run_one_tx() -> None:
        # Run right before and after the bulk stream too (the median is the figure), so both sides of
        # feedback_bulk_vs_raw_sqlite see the same load on a shared host, not two different moments.
        tagged = [(f"tx{len(one_tx_runs)}-{r[0]}", *r[1:]) for r in rows]
        one_tx_runs.append(bench_sqlite(tmp / "baseline.db", tagged, commit_each=False))

    batches = (args.batch_size, args.batch_clients)
    server = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), url], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fpb_grpc.FeedbackServiceStub(channel)
            await bench_stream(stub, make_events("warm", 500, completions))
            await bench_batches(port, make_events("warmb", 2000, completions), *batches)
            bulk_events = make_events("bulk", args.bulk_events, completions)
            stream_events = make_events("stream", args.bulk_events, completions)
            run_one_tx()
            bulk = await bench_batches(port, bulk_events, *batches)
            run_one_tx()
            stream = await bench_stream(stub, stream_events)
            run_one_tx()
        per_client = [make_events(f"u{c}", args.per_client, completions) for c in range(args.clients)]
        unary = await bench_unary(port, per_client)
    finally:
        server.terminate()
        server.wait(30)
    echo_server = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo_server.stdout.readline().split()[1])  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fpb_grpc.FeedbackServiceStub(channel)
            await bench_stream(stub, bulk_events[:500])
            echo = await bench_stream(stub, bulk_events)
        await bench_batches(port, bulk_events[:2000], *batches)
        echo_batch = await bench_batches(port, bulk_events, *batches)
    finally:
        echo_server.terminate()
        echo_server.wait(30)

    per_commit = bench_sqlite(tmp / "baseline.db", rows[: args.baseline_commits], commit_each=True)
    run_one_tx()
    one_tx = statistics.median(one_tx_runs)

    print(f"bulk batches:  {bulk:9.0f} events/s acked after commit ({args.bulk_events} events, "
          f"{args.batch_clients} clients x batches of {args.batch_size})")  # fmt: skip
    print(f"bulk stream:   {stream:9.0f} events/s acked after commit ({args.bulk_events} events, goal >= 5000)")
    print(f"unary x{args.clients}:     {unary:9.0f} events/s acked after commit "
          f"({args.clients}x{args.per_client} events, goal >= 1000)")  # fmt: skip
    print(f"sqlite3, commit per row: {per_commit:9.0f} rows/s ({args.baseline_commits} rows)")
    print(f"sqlite3, one tx:         {one_tx:9.0f} rows/s ({len(rows)} rows; median of "
          f"{', '.join(f'{r:.0f}' for r in one_tx_runs)}: around the batches and the stream, and last)")  # fmt: skip
    print(f"ratios: bulk/commit-per-row {bulk / per_commit:.1f}x, unary/commit-per-row {unary / per_commit:.1f}x, "
          f"bulk/one-tx {bulk / one_tx:.2f}x, stream/one-tx {stream / one_tx:.3f}x")  # fmt: skip
    print(f"grpc echo (no store): stream {echo:9.0f} events/s, echo/one-tx {echo / one_tx:.3f}x, "
          f"stream/echo {stream / echo:.2f}x; batches {echo_batch:9.0f} events/s, echo/one-tx "
          f"{echo_batch / one_tx:.3f}x, bulk/echo {bulk / echo_batch:.2f}x")  # fmt: skip
    print(f"feedback_stream_vs_raw_sqlite: {stream / one_tx:.3f}")
    print(f"feedback_bulk_vs_raw_sqlite: {bulk / one_tx:.3f}")
    print(f"feedback_bulk_events_per_s: {bulk:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk-events", type=int, default=20_000, help="events in the bulk batches and the stream")
    parser.add_argument("--batch-size", type=int, default=500, help="events per SubmitFeedbackBatch call")
    parser.add_argument("--batch-clients", type=int, default=4, help="concurrent batch clients")
    parser.add_argument("--clients", type=int, default=32, help="concurrent unary clients")
    parser.add_argument("--per-client", type=int, default=100, help="unary calls per client")
    parser.add_argument("--baseline-commits", type=int, default=2000, help="rows of the commit-per-row baseline")
    parser.add_argument("--echo-server", action="store_true", help="run only the storeless echo server (step 4)")
    args = parser.parse_args()
    asyncio.run(serve_echo() if args.echo_server else main(args))
