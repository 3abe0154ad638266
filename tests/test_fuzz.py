"""Property-based fuzzing through the public gRPC API: on every RPC, unary and streaming, admin
included, hostile and absurd requests get OK or a precise status with a plain message, and the
server keeps serving. A bounded, derandomised number of examples here; bench/fuzz.py runs more.
The feedback RPCs need no engine, so they are fuzzed on their own too, with more examples, and with
batches that decode but mix good and bad events (each event keeps its own answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import hypothesis
import pytest
from api_fuzz import ACCEPTABLE, METHODS, fuzz_method, varint
from completion_factory import make_completion
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from tuneloop.server.decoding import DecodeGuardInterceptor
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.servicers.feedback import FeedbackServicer
from tuneloop.server.store import Store, open_store
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

EXAMPLES_PER_RPC = 30
FEEDBACK_METHODS = [m for m in METHODS if m.containing_service.name == "FeedbackService"]


def fuzz(port: int, examples: int, methods: list[MethodDescriptor] = METHODS) -> list[str]:
    """`examples` derandomised requests on every RPC of `methods`; one line per bad answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        return [line for method in methods for line in fuzz_method(channel, method, examples, derandomize=True)]


def test_the_wire_encoder_matches_protobuf() -> None:
    assert varint(1) == b"\x01" and varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # 64-bit two's complement, as protobuf sends it
    req = pb.SamplingParams(max_tokens=300)
    assert req.SerializeToString() == b"\x08" + varint(300)


def test_every_feedback_rpc_is_fuzzed() -> None:
    names = {m.name for m in FEEDBACK_METHODS}
    assert {"SubmitFeedback", "SubmitFeedbackStream", "SubmitFeedbackBatch"} <= names


@asynccontextmanager
async def guarded_feedback_server(store: Store) -> AsyncIterator[int]:
    """The FeedbackService behind the server's decode guard, as `tuneloop serve` runs it; no engine."""
    metrics = Metrics()
    service = FeedbackService(store, metrics)
    service.start()
    server = grpc.aio.server(interceptors=[DecodeGuardInterceptor(metrics)])
    fpb_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(service, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=1.0)
        await service.close()


async def test_hostile_feedback_requests_without_an_engine(tmp_path: Path) -> None:
    # Cheap enough to draw more examples than the whole-API test, on the RPCs that write.
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    async with guarded_feedback_server(store) as port:
        bad = await asyncio.to_thread(fuzz, port, 50, FEEDBACK_METHODS)
    store.close()
    assert not bad, "\n".join(bad[:20])


# Batches that decode, mixing real and unknown completion ids, reused event ids and absurd values.
_IDS = st.sampled_from(["", "e1", "e2", "e3", "bad id", "x" * 200])
_VALUES = st.integers(min_value=-1, max_value=7)


def _events(cids: list[str]) -> st.SearchStrategy[list[fpb.FeedbackEvent]]:
    completion = st.sampled_from([*cids, "", "cmpl-nope"])
    kinds = st.one_of(
        st.builds(lambda c, v: {"thumbs": fpb.ThumbsFeedback(completion_id=c, value=v)}, completion, _VALUES),
        st.builds(lambda c, v: {"rating": fpb.RatingFeedback(completion_id=c, score=max(v, 0))}, completion, _VALUES),
        st.builds(lambda c, t: {"correction": fpb.CorrectionFeedback(completion_id=c, corrected_text=t)},
                  completion, st.text(max_size=8)),
        st.builds(lambda a, b, v: {"pairwise": fpb.PairwiseFeedback(first_completion_id=a, second_completion_id=b,
                                                                    choice=v)}, completion, completion, _VALUES),
        st.just({}),
    )  # fmt: skip
    event = st.builds(
        lambda kind, event_id, rater, tags: fpb.FeedbackEvent(event_id=event_id, rater_id=rater, reason_tags=tags,
                                                              **kind),
        kinds, _IDS, st.sampled_from(["", "alice", "bob"]), st.lists(st.sampled_from(["ok", "", "t"]), max_size=2),
    )  # fmt: skip
    return st.lists(event, max_size=12)


async def test_decodable_hostile_batches_keep_the_per_event_contract(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/fb.db")
    completions = [make_completion("p", "a"), make_completion("p", "b"), make_completion("q", "c")]
    store.write_completions(completions)
    async with guarded_feedback_server(store) as port:

        def run() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = fpb_grpc.FeedbackServiceStub(channel)

                @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
                @hypothesis.given(_events([c.completion_id for c in completions]))
                def one(events: list[fpb.FeedbackEvent]) -> None:
                    before = store.count_feedback()
                    acks = stub.SubmitFeedbackBatch(fpb.SubmitFeedbackBatchRequest(events=events)).acks
                    assert [a.stream_index for a in acks] == list(range(len(events)))
                    for ack, event in zip(acks, events, strict=True):
                        if ack.HasField("error"):
                            assert grpc.StatusCode[ack.error.code_name] in ACCEPTABLE, ack.error
                            assert ack.event_id == event.event_id and ack.sequence == 0
                        else:
                            assert ack.sequence > 0 and ack.event_id == (event.event_id or ack.event_id)
                    new = {a.event_id for a in acks if not a.HasField("error") and not a.duplicate}
                    assert store.count_feedback() == before + len(new)  # every new ack is one stored row

                one()

        await asyncio.to_thread(run)
    assert store.count_feedback() > 0  # the draws reached the commit too, not only the refusals
    store.close()


@pytest.mark.engine
async def test_hostile_requests_get_precise_statuses_and_the_server_keeps_serving(make_server) -> None:
    # Small limits keep the requests that are valid cheap to serve.
    server = await make_server(max_tokens_limit=8, default_max_tokens=4)
    bad = await asyncio.to_thread(fuzz, server.port, EXAMPLES_PER_RPC)
    assert not bad, "\n".join(bad[:20])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        r = await pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=2))
        )
        assert r.completions[0].text is not None and r.completions[0].usage.completion_tokens >= 1
