"""The store's lease contract on SQLite and on a real PostgreSQL server: one holder among racing
threads and processes, handover on release and on a dead holder's expiry, fencing tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tuneloop.server.store import Lease, Store

NAME = "canary-decider"
HOLDER_SCRIPT = Path(__file__).with_name("lease_holder.py")
T = TypeVar("T")


def eventually(attempt: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Retries `attempt` until it returns something (a lease taken, a condition met)."""
    deadline = time.monotonic() + timeout
    while (got := attempt()) is None:
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)
    return got


def test_take_renew_refuse_and_release(store: Store) -> None:
    assert store.get_lease(NAME) is None
    a = store.acquire_lease(NAME, "a", 60.0)
    assert a is not None and a.token == 1 and a.expires_at > a.acquired_at
    assert store.acquire_lease(NAME, "b", 60.0) is None
    renewed = store.acquire_lease(NAME, "a", 60.0)
    assert renewed is not None and renewed.token == a.token and renewed.acquired_at == a.acquired_at
    assert renewed.expires_at >= a.expires_at
    assert store.lease_is_current(a) and store.get_lease(NAME) == renewed
    # Leases are independent by name.
    other = store.acquire_lease("another-role", "b", 60.0)
    assert other is not None and other.token == 1
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lease(NAME, "a", 0.0)


def test_release_hands_over_at_once_with_a_higher_token(store: Store) -> None:
    a = store.acquire_lease(NAME, "a", 60.0)
    assert a is not None and store.acquire_lease(NAME, "b", 60.0) is None
    assert store.release_lease(a)
    assert not store.lease_is_current(a)
    b = store.acquire_lease(NAME, "b", 60.0)  # no waiting for the 60 s to run out
    assert b is not None and b.token == a.token + 1
    # A stale holder can neither release nor renew the new holder's lease.
    assert not store.release_lease(a)
    assert store.acquire_lease(NAME, "a", 60.0) is None
    assert store.lease_is_current(b)


def test_an_expired_holders_renewal_fails_once_another_took_over(store: Store) -> None:
    a = store.acquire_lease(NAME, "a", 0.3)
    assert a is not None
    b = eventually(lambda: store.acquire_lease(NAME, "b", 60.0))
    assert b.token == a.token + 1 and b.acquired_at >= a.expires_at  # only after the TTL, in the database's clock
    assert store.acquire_lease(NAME, "a", 60.0) is None
    assert not store.lease_is_current(a) and store.lease_is_current(b)


def test_a_lapsed_term_of_the_same_holder_gets_a_new_token(store: Store) -> None:
    a = store.acquire_lease(NAME, "a", 0.2)
    assert a is not None
    eventually(lambda: True if not store.lease_is_current(a) else None)
    again = store.acquire_lease(NAME, "a", 60.0)
    # Another holder may have acted in between as far as "a" can know: a new term, a new token.
    assert again is not None and again.token == a.token + 1


def _race(store: Store, holders: list[str]) -> list[Lease]:
    """Every holder tries to take the lease at the same moment, each on its own thread."""
    start = threading.Barrier(len(holders))
    results: list[Lease | None] = [None] * len(holders)

    def contend(i: int) -> None:
        start.wait()
        results[i] = store.acquire_lease(NAME, holders[i], 60.0)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(holders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def test_exactly_one_of_many_racing_threads_holds_it_each_round(store: Store) -> None:
    tokens = []
    for round_ in range(4):
        won = _race(store, [f"replica-{round_}-{i}" for i in range(12)])
        assert len(won) == 1, f"round {round_}: {len(won)} holders"
        tokens.append(won[0].token)
        assert store.release_lease(won[0])
    assert tokens == [1, 2, 3, 4]


def _spawn_holder(url: str, holder: str, ttl_s: float, renew_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOLDER_SCRIPT), url, NAME, holder, str(ttl_s), str(renew_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_racing_processes_one_wins_and_its_death_hands_over_after_the_ttl(store_url: str, store: Store) -> None:
    ttl_s, renew_s = 1.0, 0.1
    procs = [_spawn_holder(store_url, f"process-{i}", ttl_s, renew_s) for i in range(4)]
    try:
        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        first = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        holders = [i for i, out in enumerate(first) if out["token"] is not None]
        assert len(holders) == 1, first
        winner = procs[holders[0]]
        assert winner.stdout is not None
        renewal = json.loads(winner.stdout.readline())  # it lives and renews: nobody else may take it
        assert renewal["token"] == first[holders[0]]["token"]
        assert store.acquire_lease(NAME, "successor", ttl_s) is None
        winner.kill()  # dies without releasing
        winner.wait()
        dead = store.get_lease(NAME)
        assert dead is not None and dead.holder == f"process-{holders[0]}"
        successor = eventually(lambda: store.acquire_lease(NAME, "successor", ttl_s))
        assert successor.token == dead.token + 1
        assert successor.acquired_at >= dead.expires_at  # not one moment before the dead holder's TTL ran out
    finally:
        for p in procs:
            p.kill()
            p.wait()
