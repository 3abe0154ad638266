"""The SDK over several replicas: round_robin across the healthy ones, retries only where a repeat is
safe, and never a second copy of streamed output, against two scripted replicas in this process
(tests/scripted_replicas.py). No engine, no model."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from scripted_replicas import NOT_SERVING, SERVING, Running, scripted_replicas

from tuneloop.cli import common
from tuneloop.client import AsyncClient, Client, InvalidArgumentError, UnavailableError
from tuneloop.client._transport import ChannelConfig
from tuneloop.client.balancing import balanced_target, service_config, split_targets


@pytest.fixture
def replicas() -> Iterator[list[Running]]:
    with scripted_replicas() as running:
        yield running


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
