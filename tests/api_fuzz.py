"""Property-based fuzzing of the public gRPC API: hostile and absurd requests on every RPC.

Requests are drawn at the wire level from each method's message descriptor, so they can carry what
a well-behaved client library refuses to send: invalid UTF-8 and lone surrogates in strings,
unknown enum numbers, out-of-range and negative varints, NaN and infinite floats, fields repeated
thousands of times, nesting at every depth, and bytes that are not a message at all. Every answer
must be OK or a precise status with a plain message; UNKNOWN, INTERNAL and the like mean a request
reached code that did not expect it. Used by tests/test_fuzz.py (a bounded number of examples)
and bench/fuzz.py (many more).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import hypothesis
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import strategies as st

from tuneloop.v1 import admin_pb2, feedback_pb2, generation_pb2

METHODS: list[MethodDescriptor] = [
    m
    for module in (generation_pb2, feedback_pb2, admin_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]
# Statuses that say what was wrong with the request (or the state it asked about).
ACCEPTABLE = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
})  # fmt: skip
# Text that only a leaked exception puts into a status message.
_LEAKS = ("Traceback", "<class", "Exception calling application", "Unexpected ")

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_DEPTH = 3


# -- wire encoding (what a hostile client sends; no validation on purpose) ---------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers go on the wire as 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, wire_type: int, payload: bytes) -> bytes:
    head = varint(number << 3 | wire_type)
    return head + (varint(len(payload)) + payload if wire_type == _LEN else payload)


# -- strategies --------------------------------------------------------------------------------
INTEGERS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 8, 9, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -1, -(2**31), -(2**63)]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 1e-45, 3.4e38]), st.floats(width=32))  # NaN and inf included
DOUBLES = st.floats()
STRINGS = st.one_of(
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),  # control chars, lone surrogates
    st.sampled_from([b"", b"base", b"default", b"v1", b"v0", b"u", b"\x00", b"\xff\xfe", b"\xed\xa0\x80", b"a" * 300]),
    st.binary(max_size=40),  # anything, valid UTF-8 or not
    st.integers(min_value=1_000, max_value=200_000).map(lambda n: b"x" * n),  # huge
)
REPEATS = st.one_of(st.integers(min_value=1, max_value=3), st.sampled_from([9, 33, 257, 5000]))


@st.composite
def _value(draw: st.DrawFn, field: FieldDescriptor, depth: int) -> tuple[int, bytes]:
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _LEN, draw(message(field.message_type, depth + 1))
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return _LEN, draw(STRINGS)
    if t == FieldDescriptor.TYPE_FLOAT:
        return _FIXED32, struct.pack("<f", draw(FLOATS))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _FIXED64, struct.pack("<d", draw(DOUBLES))
    if t == FieldDescriptor.TYPE_BOOL:
        return _VARINT, varint(draw(st.sampled_from([0, 1, 2, 2**64 - 1])))
    if t in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        return _FIXED32, struct.pack("<I", draw(INTEGERS) & 0xFFFFFFFF)
    if t in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        return _FIXED64, struct.pack("<Q", draw(INTEGERS) & (2**64 - 1))
    return _VARINT, varint(draw(INTEGERS))  # int32/64, uint32/64, sint, enums (unknown numbers too)


@st.composite
def message(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> bytes:
    """Wire bytes of one `desc` message: a random subset of its fields, each maybe repeated (the
    last occurrence wins for a singular field, and a oneof's members may all be set)."""
    if depth >= _MAX_DEPTH:
        return b""
    out = bytearray()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        count = draw(REPEATS) if repeated or draw(st.integers(0, 9)) == 0 else 1
        if count > 50:  # one value, many times: a huge repeated field without a huge draw
            wire, payload = draw(_value(field, depth))
            if len(payload) > 256:
                payload = payload[:256] if field.type != FieldDescriptor.TYPE_MESSAGE else b""
            out += field_bytes(field.number, wire, payload) * count
            continue
        for _ in range(count):
            wire, payload = draw(_value(field, depth))
            out += field_bytes(field.number, wire, payload)
    if draw(st.integers(0, 19)) == 0:  # a field number the schema does not have
        out += field_bytes(draw(st.integers(20, 2**29 - 1)), _VARINT, varint(draw(INTEGERS)))
    return bytes(out)


def request(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """A request for `method`: usually structured, sometimes bytes that are no message at all."""
    return st.one_of(message(method.input_type), message(method.input_type), st.binary(max_size=64))


def requests(method: MethodDescriptor) -> st.SearchStrategy[list[bytes]]:
    """One request, or a short stream of them for a client-streaming method."""
    if method.client_streaming:
        return st.lists(request(method), min_size=0, max_size=4)
    return request(method).map(lambda b: [b])


# -- calling and judging -----------------------------------------------------------------------
@dataclass
class Answer:
    code: grpc.StatusCode
    details: str

    @property
    def bad(self) -> str | None:
        """Why this answer is wrong, or None."""
        if self.code not in ACCEPTABLE:
            return f"status {self.code.name}: {self.details[:200]!r}"
        if any(leak in self.details for leak in _LEAKS):
            return f"{self.code.name} with a leaked exception: {self.details[:200]!r}"
        return None


def call(channel: grpc.Channel, method: MethodDescriptor, messages: list[bytes], timeout: float = 60.0) -> Answer:
    """Send raw request bytes to `method` and return the status it ended with (OK when it ended
    well); a stream is read to its end."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    raw = {"request_serializer": None, "response_deserializer": None}
    try:
        if method.client_streaming:
            stream: Iterator[bytes] = iter(messages)
            if method.server_streaming:
                for _ in channel.stream_stream(path, **raw)(stream, timeout=timeout):
                    pass
            else:
                channel.stream_unary(path, **raw)(stream, timeout=timeout)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **raw)(messages[0], timeout=timeout):
                pass
        else:
            channel.unary_unary(path, **raw)(messages[0], timeout=timeout)
    except grpc.RpcError as exc:
        return Answer(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
    return Answer(grpc.StatusCode.OK, "")


def fuzz_method(
    channel: grpc.Channel, method: MethodDescriptor, examples: int, *, derandomize: bool = False, seed: int = 0
) -> list[str]:
    """Draw `examples` requests for `method` and send each; one line per bad answer. No
    shrinking: a bench counts bad answers, a test prints them with the request that caused it."""
    bad: list[str] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples, deadline=None, database=None, derandomize=derandomize,
        phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
    )  # fmt: skip
    @hypothesis.given(requests(method))
    def one(messages: list[bytes]) -> None:
        why = call(channel, method, messages).bad
        if why:
            bad.append(f"{method.containing_service.name}.{method.name}: {why} for {[m[:80] for m in messages]!r}")

    one()
    return bad
