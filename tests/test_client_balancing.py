"""The SDK over several replicas: round_robin across the healthy ones, retries only where a repeat is
safe, and never a second copy of streamed output. The replicas are two small scripted gRPC servers
in this process with the standard health service (gRPC's own balancer, health watch and retries are
what is tested, so the servicers only need to say who answered). No engine, no model."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tuneloop.cli import common
from tuneloop.client import AsyncClient, Client, InvalidArgumentError, UnavailableError
from tuneloop.client._transport import ChannelConfig
from tuneloop.client.balancing import HEALTH_SERVICE, balanced_target, service_config, split_targets
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Replica(pb_grpc.GenerationServiceServicer, fpb_grpc.FeedbackServiceServicer):
    """A replica that names itself in every answer. `unavailable` makes its calls fail as a dying
    replica's do; `stream_then_fail` sends one delta before failing."""

    name: str
    calls: Counter[str] = field(default_factory=Counter)
    unavailable: bool = False
    stream_then_fail: bool = False
    event_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _count(self, method: str) -> None:
        with self.lock:
            self.calls[method] += 1

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._count("Generate")
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died")
        return pb.GenerateResponse(completions=[pb.Completion(completion_id=f"cmpl-{self.name}", text=self.name)])

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._count("GenerateStream")
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died")
        yield pb.GenerateStreamResponse(completion_id=f"cmpl-{self.name}", text_delta=f"{self.name}-1 ")
        if self.stream_then_fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: the engine died mid-stream")
        yield pb.GenerateStreamResponse(
            completion_id=f"cmpl-{self.name}", completion=pb.Completion(completion_id=f"cmpl-{self.name}", text="")
        )

    def SubmitFeedback(self, request: fpb.FeedbackEvent, context: grpc.ServicerContext) -> fpb.FeedbackAck:
        self._count("SubmitFeedback")
        with self.lock:
            self.event_ids.append(request.event_id)
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: draining")
        return fpb.FeedbackAck(event_id=request.event_id or "fb-server", sequence=1)


@dataclass
class Running:
    replica: Replica
    health: health.HealthServicer
    address: str

    def set_health(self, status: int) -> None:
        self.health.set(HEALTH_SERVICE, status)


@pytest.fixture
def replicas() -> Iterator[list[Running]]:
    started: list[tuple[grpc.Server, Running]] = []
    for name in ("a", "b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        replica = Replica(name)
        pb_grpc.add_GenerationServiceServicer_to_server(replica, server)
        fpb_grpc.add_FeedbackServiceServicer_to_server(replica, server)
        checker = health.HealthServicer()
        checker.set(HEALTH_SERVICE, SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, Running(replica, checker, f"127.0.0.1:{port}")))
    yield [r for _, r in started]
    for server, _ in started:
        server.stop(grace=None)


def _answered_by(client: Client, calls: int) -> Counter[str]:
    return Counter(client.generate("hi").text for _ in range(calls))


def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    # The client learns a replica's health from its Watch stream, asynchronously: each probe is a
    # real call, and the deadline bounds a client that never learns.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def _both_in_rotation(client: Client) -> None:
    # Connections open in parallel; until both are ready and healthy, the first one takes all calls.
    _until(lambda: _answered_by(client, 2) == {"a": 1, "b": 1}, "both replicas to join the rotation")


def test_calls_alternate_between_healthy_replicas(replicas: list[Running]) -> None:
    with Client([r.address for r in replicas], timeout=10) as client:
        assert client.target == ",".join(r.address for r in replicas)
        _both_in_rotation(client)
        assert _answered_by(client, 10) == {"a": 5, "b": 5}


def test_a_not_serving_replica_leaves_the_rotation_and_rejoins(replicas: list[Running]) -> None:
    a, b = replicas
    with Client(f"{a.address},{b.address}", timeout=10) as client:
        _both_in_rotation(client)
        a.set_health(NOT_SERVING)
        _until(lambda: _answered_by(client, 4) == {"b": 4}, "the client to drop the draining replica")
        assert _answered_by(client, 10) == {"b": 10}
        a.set_health(SERVING)
        _until(lambda: "a" in _answered_by(client, 2), "the client to take the replica back")


def test_unavailable_generate_and_feedback_are_retried_on_the_other_replica(replicas: list[Running]) -> None:
    a, b = replicas
    a.replica.unavailable = True  # its health still says SERVING: it died between two health updates
    with Client([a.address, b.address], timeout=10) as client:
        assert _answered_by(client, 6) == {"b": 6}
        assert a.replica.calls["Generate"] > 0, "the dead replica was never tried: nothing was retried"
        acks = [client.thumbs_up("cmpl-b", rater_id="r") for _ in range(6)]
    # Every try of one event carried the same id the SDK gave it: a repeat is a no-op on the store.
    assert all(ack.event_id.startswith("fb-") and ack.event_id != "fb-server" for ack in acks)
    assert len({ack.event_id for ack in acks}) == 6
    assert set(a.replica.event_ids) <= {ack.event_id for ack in acks}


def test_a_stream_failing_before_its_first_message_is_retried(replicas: list[Running]) -> None:
    a, b = replicas
    a.replica.unavailable = True
    with Client([a.address, b.address], timeout=10) as client:
        for _ in range(4):
            assert [c.text_delta for c in client.generate_stream("hi")] == ["b-1 ", ""]


def test_a_stream_failing_midway_is_not_repeated(replicas: list[Running]) -> None:
    for r in replicas:
        r.replica.stream_then_fail = True
    with Client([r.address for r in replicas], timeout=10) as client:
        received: list[str] = []
        with pytest.raises(UnavailableError, match="mid-stream"):
            for chunk in client.generate_stream("hi"):
                received.append(chunk.text_delta)
    # One delta, once: the caller holds what it got and a typed error, never a second replica's copy.
    assert len(received) == 1
    assert sum(r.replica.calls["GenerateStream"] for r in replicas) == 1


async def test_async_client_balances_too(replicas: list[Running]) -> None:
    async with AsyncClient([r.address for r in replicas], timeout=10) as client:
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while seen != {"a", "b"} and time.monotonic() < deadline:
            seen.add((await client.generate("hi")).text)
    assert seen == {"a", "b"}


def test_a_single_target_connects_as_before(replicas: list[Running]) -> None:
    a, _ = replicas
    assert ChannelConfig(a.address).channel_args() == (a.address, [])
    a.replica.unavailable = True
    with Client(a.address, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.generate("hi")
        with pytest.raises(UnavailableError):
            client.thumbs_up("cmpl-a", rater_id="r")
    # No retry, and the event goes without an id for the server to assign, as it always has.
    assert a.replica.calls == {"Generate": 1, "SubmitFeedback": 1}
    assert a.replica.event_ids == [""]


def test_targets_and_service_config() -> None:
    assert split_targets("h1:1, h2:2") == ("h1:1", "h2:2")
    assert split_targets(["h1:1", "h2:2"]) == ("h1:1", "h2:2")
    assert split_targets("ipv4:10.0.0.1:1,10.0.0.2:1") == ("ipv4:10.0.0.1:1,10.0.0.2:1",)
    assert balanced_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert balanced_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert balanced_target(["localhost:7"]) == "dns:///localhost:7"
    assert balanced_target(["dns:///replicas:7"]) == "dns:///replicas:7"
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "tuneloop.v1.GenerationService"}
    retried = {(n["service"], n["method"]) for c in config["methodConfig"] for n in c["name"]}
    assert ("tuneloop.v1.FeedbackService", "SubmitFeedback") in retried
    assert not retried & {("tuneloop.v1.AdminService", m) for m in ("Promote", "Rollback", "SetCanary", "Unload")}


@pytest.mark.parametrize(
    ("target", "kwargs", "match"),
    [
        ("h1:1,,h2:2", {}, "host:port or several"),
        ("127.0.0.1:1,h2", {}, "must be host:port"),
        ("127.0.0.1:1,127.0.0.1:2", {"balance": False}, "balance=False needs one target"),
        ("no-such-host.invalid:1,127.0.0.1:2", {}, "cannot resolve 'no-such-host.invalid'"),
        (["dns:///x:1", "127.0.0.1:2"], {}, "cannot be combined"),
    ],
)
def test_bad_targets_are_refused_with_what_to_change(
    target: str | list[str], kwargs: dict[str, bool], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        Client(target, **kwargs)


def test_cli_target_takes_several_replicas(replicas: list[Running]) -> None:
    parser = common.client_options()
    args = parser.parse_args(["--target", ",".join(r.address for r in replicas), "--timeout", "10"])
    with common.connect(args) as client:
        _both_in_rotation(client)
