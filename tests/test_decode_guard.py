"""Bytes that are not a valid protobuf message get INVALID_ARGUMENT with a plain message on every
RPC, unary and streaming, admin included, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.v1 import admin_pb2, feedback_pb2, generation_pb2

# A field-1 varint whose ten continuation bytes never end: no protobuf parser accepts it.
GARBAGE = b"\x08" + b"\xff" * 10
METHODS = [
    (service.full_name, m)
    for module in (generation_pb2, feedback_pb2, admin_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]


def _call(channel: grpc.aio.Channel, path: str, method) -> grpc.aio.Call:  # type: ignore[no-untyped-def]
    raw = {"request_serializer": None, "response_deserializer": None}
    if method.client_streaming:
        stream = (lambda: iter([GARBAGE]))()
        if method.server_streaming:
            return channel.stream_stream(path, **raw)(stream)
        return channel.stream_unary(path, **raw)(stream)
    if method.server_streaming:
        return channel.unary_stream(path, **raw)(GARBAGE)
    return channel.unary_unary(path, **raw)(GARBAGE)


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.rsplit('.', 1)[-1]}.{m.name}" for s, m in METHODS])
async def test_undecodable_request_is_invalid_argument(channel: grpc.aio.Channel, service: str, method) -> None:  # type: ignore[no-untyped-def]
    call = _call(channel, f"/{service}/{method.name}", method)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "is not a valid" in (err.details() or "") and "class" not in (err.details() or "")
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # A well-formed request on the same channel still works.
    ok = await channel.unary_unary(
        "/tuneloop.v1.GenerationService/Generate",
        request_serializer=generation_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generation_pb2.GenerateResponse.FromString,
    )(generation_pb2.GenerateRequest(prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=1)))
    assert ok.completions
