"""The shipped deploy/haproxy/haproxy.cfg on the real HAProxy, in front of two scripted replicas
(tests/scripted_replicas.py): it balances calls, and its grpc.health.v1 check takes a replica that
answers NOT_SERVING out of the rotation and puts it back when it serves again. No engine, no model;
tests/test_replicas.py runs the same config in front of real replicas."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from haproxy_front import HAPROXY_CFG, haproxy_binary, haproxy_front
from scripted_replicas import NOT_SERVING, SERVING, Running, scripted_replicas

from tuneloop.client import Client


@pytest.fixture
def front(tmp_path: Path) -> Iterator[tuple[str, list[Running]]]:
    with scripted_replicas() as replicas, haproxy_front([r.address for r in replicas], tmp_path / "log") as address:
        yield address, replicas


def _answered_by(client: Client, calls: int) -> Counter[str]:
    return Counter(client.generate("hi").text for _ in range(calls))


def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    # HAProxy learns a replica's health at its next check (every second): each probe is a real
    # call through it, and the deadline bounds a check that never notices.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def test_calls_take_turns_and_a_not_serving_replica_leaves_until_it_serves(front: tuple[str, list[Running]]) -> None:
    address, (a, b) = front
    with Client(address, timeout=10) as client:
        assert _answered_by(client, 6) == {"a": 3, "b": 3}
        a.set_health(NOT_SERVING)
        _until(lambda: _answered_by(client, 4) == {"b": 4}, "HAProxy to take the replica out")
        assert _answered_by(client, 6) == {"b": 6}
        a.set_health(SERVING)
        _until(lambda: "a" in _answered_by(client, 2), "HAProxy to put the replica back")
        chunks = list(client.generate_stream("hi"))  # streams pass through h2 both ways
        assert len(chunks) == 2 and chunks[-1].completion is not None


@pytest.mark.parametrize(
    "env",
    [
        {"TUNELOOP_REPLICA_1": "127.0.0.1:1", "TUNELOOP_REPLICA_2": "127.0.0.1:2"},
        {"TUNELOOP_BACKEND": "localhost:50051"},
        {"TUNELOOP_BACKEND": "localhost:50051", "TUNELOOP_REPLICAS_MAX": "3", "TUNELOOP_HAPROXY_BIND": ":6000"},
    ],
)
def test_the_config_is_valid_with_fixed_replicas_or_a_dns_name(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")}
    out = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
