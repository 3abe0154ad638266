"""Property-based fuzzing through the public gRPC API: on every RPC, unary and streaming, admin
included, hostile and absurd requests get OK or a precise status with a plain message, and the
server keeps serving. A bounded, derandomised number of examples here; bench/fuzz.py runs more."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from api_fuzz import METHODS, fuzz_method, varint
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

EXAMPLES_PER_RPC = 30


def fuzz(port: int, examples: int) -> list[str]:
    """`examples` derandomised requests on every RPC; one line per bad answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        return [line for method in METHODS for line in fuzz_method(channel, method, examples, derandomize=True)]


def test_the_wire_encoder_matches_protobuf() -> None:
    assert varint(1) == b"\x01" and varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # 64-bit two's complement, as protobuf sends it
    req = pb.SamplingParams(max_tokens=300)
    assert req.SerializeToString() == b"\x08" + varint(300)


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
