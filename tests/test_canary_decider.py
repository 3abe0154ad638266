"""One canary decider among replicas: replicas share a real store (SQLite, PostgreSQL) and a real
registry directory, each with its own adapter manager over a fake engine (what the engine does
with weights plays no part in who decides), and run the server's own monitor and decider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from completion_factory import make_completion
from prometheus_client import CollectorRegistry
from test_adapter_manager import MANIFEST, NAME, FakeEngine, lora

from tuneloop.server.adapters import AdapterManager
from tuneloop.server.admin import AdminService, monitor_canaries
from tuneloop.server.canary import LeaseTiming
from tuneloop.server.config import ConfigError, ServerConfig
from tuneloop.server.decider import Decider
from tuneloop.server.feedback import FeedbackEvent
from tuneloop.server.feedback.service import FeedbackService
from tuneloop.server.metrics import Metrics
from tuneloop.server.registry import DEFAULT_CHANNEL, AdapterRegistry
from tuneloop.server.store import Lease, Store, open_store

TIMING = LeaseTiming(renew_s=0.1, ttl_s=0.5)
OUTCOMES = ("rolled_back", "promoted")


@dataclass
class Replica:
    """One server's canary machinery: its own store connection, adapter manager, admin, decider."""

    store: Store
    admin: AdminService
    decider: Decider
    metrics: Metrics
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def decisions(self, outcome: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "tuneloop_canary_decisions_total", {"adapter": NAME, "decision": outcome}
            )
            or 0.0
        )

    def handovers(self, change: str) -> float:
        sample = self.metrics.registry.get_sample_value
        return sample("tuneloop_canary_decider_handovers_total", {"change": change}) or 0.0

    def is_decider(self) -> float | None:
        return self.metrics.registry.get_sample_value("tuneloop_canary_decider")

    def start(self, check_s: float = 0.02) -> None:
        self.tasks = [
            asyncio.create_task(self.decider.run()),
            asyncio.create_task(monitor_canaries(self.admin, check_s, self.decider)),
        ]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    """`current` at v1 and v2 on trial as an automatically decided canary."""
    reg = AdapterRegistry(tmp_path / "registry")
    reg.publish(NAME, lora(tmp_path), MANIFEST)
    reg.publish(NAME, lora(tmp_path), MANIFEST, channel=None)
    reg.start_canary(NAME, "v2", 0.5, auto_decide=True)
    return reg


@pytest.fixture
async def make_replica(store_url: str, registry: AdapterRegistry) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    made: list[Replica] = []

    async def make(clock: Callable[[], float] | None = None) -> Replica:
        store, metrics = open_store(store_url), Metrics(CollectorRegistry())
        manager = AdapterManager(
            FakeEngine(), registry, metrics, default_adapter=NAME, max_lora_rank=16, base_model="base@1"
        )
        await manager.sync()  # follows the registry: v1 current, v2 its canary
        decider = Decider(store, metrics, TIMING, holder=f"replica-{len(made)}", **({"clock": clock} if clock else {}))
        replica = Replica(store, AdminService(manager, registry, store, metrics), decider, metrics)
        made.append(replica)
        return replica

    yield make
    for r in made:
        await r.stop()
        r.store.close()


async def give_evidence(store: Store, outcome: str) -> None:
    """Pairwise choices between canary (v2) and current (v1) completions, all one way: 12 lost by
    the canary are enough to roll it back, 25 won to promote it."""
    wins = outcome == "promoted"
    service = FeedbackService(store, Metrics())
    service.start()
    for i in range(25 if wins else 12):
        canary = make_completion(f"prompt {i}", "canary's", adapter=(NAME, "v2"))
        stable = make_completion(f"prompt {i}", "current's", adapter=(NAME, "v1"))
        store.write_completions([canary, stable])
        ids = {"completion_id": canary.completion_id, "second_completion_id": stable.completion_id}
        await service.submit(
            FeedbackEvent(rater_id=f"rater-{i}", kind="pairwise", choice="first" if wins else "second", **ids)
        )
    await service.close()


def verdicts(registry: AdapterRegistry) -> list[str]:
    return [e["event"] for e in registry.canary_log(NAME) if e["event"] != "started"]


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Waits for a state the replicas reach on their own (they poll the store and the registry)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_of_two_replicas_exactly_one_decides_once_and_the_other_takes_over_when_it_stops(
    make_replica: Callable[..., Awaitable[Replica]], registry: AdapterRegistry, outcome: str
) -> None:
    a, b = await make_replica(), await make_replica()
    await give_evidence(a.store, outcome)
    a.start()
    b.start()
    await until(lambda: a.decisions(outcome) + b.decisions(outcome) > 0)  # counted once acted on in full
    decider, follower = (a, b) if a.decider.holds() else (b, a)
    assert decider.decider.holds() and not follower.decider.holds()
    assert (decider.is_decider(), follower.is_decider()) == (1.0, 0.0)
    assert verdicts(registry) == [outcome]
    assert (decider.decisions(outcome), follower.decisions(outcome)) == (1.0, 0.0)
    assert registry.channel(NAME, DEFAULT_CHANNEL) == ("v2" if outcome == "promoted" else "v1")

    await decider.stop()  # a clean shutdown releases the lease: the follower takes over at its next try
    assert decider.handovers("released") == 1.0 and decider.is_decider() == 0.0
    await follower.decider.keep()  # that try, now: it succeeds without waiting out the TTL
    assert follower.decider.holds()
    assert follower.handovers("acquired") == 1.0 and follower.is_decider() == 1.0
    lease = follower.decider.lease
    assert lease is not None and lease.token == 2
    # The new decider has not followed the registry yet: it still routes the ended canary and
    # judges it on the same evidence. Acting on that must change nothing.
    assert follower.admin.adapters.canaries() == [NAME]
    await follower.admin.check_canaries(fence=follower.decider.confirm)
    assert verdicts(registry) == [outcome]
    assert follower.decisions(outcome) == 0.0


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_two_deciders_that_overlap_still_act_once(
    make_replica: Callable[..., Awaitable[Replica]], registry: AdapterRegistry, outcome: str
) -> None:
    """Were two replicas ever to believe they decide at once, the registry's compare-and-set on
    the canary lets only one of them end it."""
    a, b = await make_replica(), await make_replica()
    await give_evidence(a.store, outcome)

    async def yes() -> bool:
        return True

    await asyncio.gather(a.admin.check_canaries(fence=yes), b.admin.check_canaries(fence=yes))
    assert verdicts(registry) == [outcome]
    assert a.decisions(outcome) + b.decisions(outcome) == 1.0
    assert registry.channel(NAME, DEFAULT_CHANNEL) == ("v2" if outcome == "promoted" else "v1")


async def test_a_paused_decider_whose_lease_was_taken_over_is_fenced_off(
    make_replica: Callable[..., Awaitable[Replica]], registry: AdapterRegistry
) -> None:
    """A replica paused past its TTL wakes up believing it decides (its clock stood still); the
    fencing token read back from the store stops it, and the new decider acts."""
    paused = await make_replica(clock=lambda: 0.0)
    await paused.decider.keep()
    assert paused.decider.holds()
    successor = await make_replica()
    await give_evidence(successor.store, "rolled_back")
    successor.tasks.append(asyncio.create_task(successor.decider.run()))
    async with asyncio.timeout(10 * TIMING.ttl_s + 5):
        await successor.decider.wait_held()  # after the paused replica's TTL, by the store's clock
    assert paused.decider.holds()  # what it believes
    await paused.admin.check_canaries(fence=paused.decider.confirm)
    assert verdicts(registry) == [] and registry.canary(NAME) is not None
    assert not paused.decider.holds() and paused.handovers("lost") == 1.0
    await successor.admin.check_canaries(fence=successor.decider.confirm)
    assert verdicts(registry) == ["rolled_back"]


class FailingStore:
    """A real store whose lease calls start failing on demand (an unreachable database)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.down = False

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        if self.down:
            raise ConnectionError("the database does not answer")
        return self._store.acquire_lease(name, holder, ttl_s)

    def __getattr__(self, attr: str) -> object:
        return getattr(self._store, attr)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(f"sqlite:///{tmp_path}/leases.db")
    yield store
    store.close()


async def test_a_failed_renewal_stops_deciding_at_once_and_a_late_one_at_its_local_deadline(
    sqlite_store: Store,
) -> None:
    now = [0.0]
    failing = FailingStore(sqlite_store)
    metrics = Metrics(CollectorRegistry())
    decider = Decider(failing, metrics, TIMING, holder="replica-0", clock=lambda: now[0])  # type: ignore[arg-type]
    await decider.keep()
    assert decider.holds()
    # It counts on the lease until one renew interval before the store can expire it.
    now[0] = TIMING.ttl_s - TIMING.renew_s - 0.001
    assert decider.holds()
    now[0] += 0.002
    assert not decider.holds()
    await decider.keep()  # renewed (the same term: the store's clock has not passed its TTL)
    assert decider.holds() and decider.lease is not None and decider.lease.token == 1
    failing.down = True
    await decider.keep()
    assert not decider.holds() and not await decider.confirm()
    assert metrics.registry.get_sample_value("tuneloop_canary_decider_handovers_total", {"change": "lost"}) == 1.0
    assert metrics.registry.get_sample_value("tuneloop_canary_decider") == 0.0


async def test_a_retired_replica_hands_over_at_once_and_no_longer_contends(sqlite_store: Store) -> None:
    """A replica whose engine died cannot promote a canary (it cannot load it): it must not hold
    the role, nor keep the others from it."""
    dying, other = (Decider(sqlite_store, Metrics(CollectorRegistry()), TIMING, holder=h) for h in ("dying", "other"))
    await dying.keep()
    assert dying.holds()
    await dying.retire("its inference engine died")
    assert not dying.holds()
    await other.keep()
    taken = other.lease
    assert other.holds() and taken is not None and taken.token == 2
    await other.release()
    await dying.keep()  # the lease is free, but not for a retired replica
    assert not dying.holds() and sqlite_store.get_lease(dying.name) == replace(taken, expires_at=0.0)


def test_the_lease_settings_are_validated_with_the_flags_named() -> None:
    with pytest.raises(ConfigError, match=r"--canary-lease-ttl-s.*at least 3x"):
        ServerConfig(canary_lease_renew_s=2.0, canary_lease_ttl_s=5.0)
    with pytest.raises(ConfigError, match="renew interval must be > 0"):
        ServerConfig(canary_lease_renew_s=0.0)
    assert ServerConfig().canary_lease() == LeaseTiming(renew_s=2.0, ttl_s=6.0)
