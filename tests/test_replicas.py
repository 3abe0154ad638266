"""Two real `tuneloop serve` replicas on one PostgreSQL store and one adapter registry on an object
store (S3 on the session's loopback moto server), as several hosts share them, reached through
the SDK's round_robin client and through the real HAProxy with deploy/haproxy/haproxy.cfg.

The replicas start once for the module (each a real engine on the real model); the tests run in
order on them: traffic reaches both, a publish is served by both, a replica SIGKILLed under load
costs no retried call and rejoins when restarted, HAProxy balances and health-checks them, and a
SIGTERM drains with NOT_SERVING first.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from haproxy_front import haproxy_front
from replica_set import Replica, ReplicaSet

from tuneloop.client import Client, TuneloopError
from tuneloop.client.balancing import HEALTH_SERVICE
from tuneloop.server.registry import base_model_fingerprint, open_registry
from tuneloop.server.store import open_store

pytestmark = pytest.mark.engine

NAME = "default"
GENERATE_OK = {"method": "Generate", "code": "OK"}


@pytest.fixture(scope="module")
def registry_url(s3_endpoint: str) -> str:
    import s3fs

    s3fs.S3FileSystem().mkdir("tuneloop-replicas")
    return "s3://tuneloop-replicas/registry"


@pytest.fixture(scope="module")
def cluster(
    model_dir: Path, postgres: Any, registry_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaSet]:
    root = tmp_path_factory.mktemp("replicas")
    replicas = ReplicaSet(
        model_dir=model_dir,
        store_url=postgres.create_database(),
        root=root,
        # The replicas inherit the AWS variables that point at the S3 server.
        registry_flags=["--registry-url", registry_url],
        flags=[
            "--max-model-len",
            "512",
            "--max-tokens-limit",
            "256",
            "--max-num-seqs",
            "16",
            "--default-adapter",
            NAME,
            "--grace-period-s",
            "30",
            # Feedback may reach another replica than the one that answered: the record must be in
            # the shared store before the caller holds its id.
            "--durable-completions",
        ],  # fmt: skip
    )
    try:
        replicas.start()
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def client(cluster: ReplicaSet) -> Iterator[Client]:
    with Client(cluster.addresses, timeout=120) as c:
        yield c


def _served(cluster: ReplicaSet) -> list[float]:
    return [r.metric("tuneloop_requests_total", **GENERATE_OK) for r in cluster.replicas]


def _until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    # Each probe is a real call or a read of the replicas' metrics; the deadline only bounds a failure.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_round_robin_reaches_both_replicas(cluster: ReplicaSet, client: Client) -> None:
    before = _served(cluster)
    for _ in range(6):
        assert client.generate("Hi", max_tokens=2).completions[0].completion_tokens > 0
    after = _served(cluster)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_a_publish_is_served_by_every_replica(
    cluster: ReplicaSet, client: Client, registry_url: str, model_dir: Path, lora_dirs: dict[str, Path]
) -> None:
    registry = open_registry(registry_url, cluster.root / "trainer-cache")  # as the trainer publishes
    manifest = {"base_model": base_model_fingerprint(model_dir), "metrics": {"heldout_accuracy": 0.8}}
    version = registry.publish(NAME, lora_dirs["r8a"], manifest).version
    for replica in cluster.replicas:
        with Client(replica.address, timeout=120) as one:

            def serves(one: Client = one) -> bool:
                return one.generate("Hi", max_tokens=1).completions[0].adapter_version == version

            _until(serves, f"replica {replica.index} to serve {version}")
    # Through the balancer every answer now names the new version, whichever replica gave it.
    assert {client.generate("Hi", max_tokens=1).completions[0].adapter_version for _ in range(4)} == {version}


def test_a_replica_killed_under_load_fails_no_retried_call_and_rejoins(cluster: ReplicaSet, client: Client) -> None:
    ids = [client.generate("Hi", max_tokens=2).completions[0].completion_id for _ in range(4)]
    done: Counter[str] = Counter()
    failures: list[TuneloopError] = []
    progress = threading.Condition()
    stop = {"feedback": threading.Event(), "generate": threading.Event()}

    def traffic(kind: str, worker: int) -> None:
        i = 0
        while not stop[kind].is_set():
            try:
                if kind == "feedback":  # idempotent: the SDK gives each event its id before sending
                    client.thumbs_up(ids[i % len(ids)], rater_id=f"rater-{worker}-{i}")
                else:
                    client.generate("Count to ten:", max_tokens=8)
                outcome = kind
            except TuneloopError as exc:
                failures.append(exc)
                outcome = "failed"
            with progress:
                done[outcome] += 1
                progress.notify_all()
            i += 1

    def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        # Woken by every finished call of the traffic threads, not by a clock.
        with progress:
            assert progress.wait_for(condition, timeout), f"timed out after {timeout:.0f} s waiting for {what}"

    threads = [threading.Thread(target=traffic, args=(k, w)) for k in ("feedback", "generate") for w in range(2)]
    for t in threads:
        t.start()
    victim = cluster.replicas[0]
    try:
        wait_for(lambda: done["generate"] >= 4 and done["feedback"] >= 20, "traffic to flow")
        cluster.kill(victim)
        at_kill = done.copy()
        wait_for(
            lambda: done["generate"] >= at_kill["generate"] + 4 and done["feedback"] >= at_kill["feedback"] + 20,
            "traffic to go on without the killed replica",
        )
        # Generation pauses while the engine restarts (on 2 cores it would slow the start several
        # times over); feedback goes on, and its calls show when the replica takes traffic again.
        stop["generate"].set()
        cluster.restart(victim)
        wait_for(
            lambda: victim.metric("tuneloop_requests_total", method="SubmitFeedback", code="OK") > 0,
            "the restarted replica to rejoin",
        )
    finally:
        for event in stop.values():
            event.set()
        for t in threads:
            t.join(180)
    assert failures == [], failures[:5]


@pytest.fixture(scope="module")
def haproxy(cluster: ReplicaSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with haproxy_front(cluster.addresses, tmp_path_factory.mktemp("haproxy") / "haproxy.log") as address:
        yield address


def test_haproxy_balances_calls_over_both_replicas(cluster: ReplicaSet, haproxy: str) -> None:
    with Client(haproxy, timeout=120) as through:
        start = _served(cluster)

        def both_answered() -> bool:
            through.generate("Hi", max_tokens=1)
            return all(a > b for a, b in zip(_served(cluster), start, strict=True))

        _until(both_answered, "calls through HAProxy to reach both replicas", timeout=60)
        chunks = list(through.generate_stream("Count to five:", max_tokens=16))
        final = chunks[-1].completion
        assert final is not None and "".join(c.text_delta for c in chunks) == final.text
        assert not through.thumbs_up(final.completion_id, rater_id="behind-haproxy").duplicate


def test_sigterm_reports_not_serving_and_finishes_the_running_stream(cluster: ReplicaSet) -> None:
    replica: Replica = cluster.replicas[1]
    with grpc.insecure_channel(replica.address) as channel, Client(replica.address, timeout=120) as one:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        count = [("user", "Count from 1 to 100, one number per line.")]
        stream = one.generate_stream(messages=count, max_tokens=96, temperature=0)
        chunks = [next(stream)]
        assert chunks[0].completion is None, "the stream ended before the drain began"
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGTERM)  # drain
        # Balancers watching the health service take it out now; the call it is running finishes.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        chunks += list(stream)
        watch.cancel()
    final = chunks[-1].completion
    assert final is not None and final.completion_tokens > 1
    assert final.text == "".join(c.text_delta for c in chunks)
    assert replica.proc.wait(60) == 0, replica.log_tail()
    store = open_store(cluster.store_url)
    try:
        assert store.get_completion(final.completion_id) is not None
    finally:
        store.close()
