"""Which replica decides canaries: the one holding the `canary-decider` lease in the store.

Replicas share one store and one registry; each runs `Decider.run()`, which takes the lease when it
is free and, while this replica holds it, renews it every `renew_s`. The database expires it `ttl_s`
after each renewal, by its own clock. This replica counts on it only until `ttl_s - renew_s` after
it *sent* the renewal (the database's expiry cannot be earlier than that), and not at all from the
moment a renewal fails: it stops deciding at least one renew interval before another replica can
take over. A replica that dies is replaced within `ttl_s`; one that shuts down cleanly releases
the lease, and another takes it at its next attempt.

Belief is not enough on its own: a process paused past its lease wakes up believing it is still
the decider. So every act is preceded by `confirm()`, which reads the lease's fencing token back
from the database, and the act itself is the registry's compare-and-set on the canary's version:
of two deciders that ever overlap, only one ends a given canary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from .canary import LeaseTiming
from .metrics import Metrics
from .store.base import Lease, Store

log = logging.getLogger(__name__)

CANARY_DECIDER = "canary-decider"


def replica_id() -> str:
    """Host, process and a random part: unique even for a pid reused after a restart."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Decider:
    """This replica's claim on one named lease: `holds()` says whether it may decide now."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        timing: LeaseTiming,
        *,
        name: str = CANARY_DECIDER,
        holder: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.holder = holder or replica_id()
        self._store = store
        self._metrics = metrics
        self._timing = timing
        self._clock = clock
        self._lease: Lease | None = None
        self._valid_until = 0.0  # on `clock`
        self._store_failing = False
        self._retired = False
        self._held = asyncio.Event()
        # Read at scrape time, so a renewal loop stuck in a hung database call cannot leave it at 1.
        metrics.canary_decider.set_function(lambda: float(self.holds()))

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def holds(self) -> bool:
        return self._lease is not None and self._clock() < self._valid_until

    async def wait_held(self) -> None:
        """Returns once this replica holds the lease."""
        while not self.holds():
            self._held.clear()  # set by the next successful take or renewal
            await self._held.wait()

    async def confirm(self) -> bool:
        """Right before an act: True only if the database still has this replica's current term."""
        lease = self._lease
        if lease is None or not self.holds():
            return False
        try:
            current = await asyncio.to_thread(self._store.lease_is_current, lease)
        except Exception as exc:  # noqa: BLE001 - unconfirmed means do not act, whatever the cause
            self._drop(lease, f"its lease could not be confirmed ({type(exc).__name__}: {exc})", "lost")
            return False
        if not current:
            self._drop(lease, f"fencing token {lease.token} is no longer current", "lost")
            return False
        return self.holds()  # the read took time

    async def keep(self) -> None:
        """One attempt: take the lease if it is free, renew it if this replica holds it."""
        if self._retired:
            return
        sent_at = self._clock()
        try:
            lease = await asyncio.to_thread(self._store.acquire_lease, self.name, self.holder, self._timing.ttl_s)
        except Exception as exc:  # noqa: BLE001 - any store failure: stop deciding, try again next time
            if self._lease is not None:
                self._drop(self._lease, f"renewing its lease failed ({type(exc).__name__}: {exc})", "lost")
            elif not self._store_failing:
                log.warning("canary decider: cannot reach the store to take the lease: %s", exc)
            self._store_failing = True
            return
        self._store_failing = False
        if self._retired:  # retired while the call ran: whatever it renewed or took goes straight back
            if lease is not None:
                await asyncio.to_thread(self._store.release_lease, lease)
            return
        # Compared with what this replica holds now: confirm() may have dropped it meanwhile.
        held = self._lease
        if lease is None:
            if held is not None:
                self._drop(held, "another replica holds the lease", "lost")
            return
        if held is not None and held.token != lease.token:
            self._drop(held, f"its term {held.token} lapsed before the renewal", "lost")
            held = None
        self._lease, self._valid_until = lease, sent_at + self._timing.ttl_s - self._timing.renew_s
        if held is None:
            log.info("canary decider: this replica (%s) is now the decider, fencing token %d", self.holder, lease.token)
            self._metrics.canary_decider_handovers.labels("acquired").inc()
        self._held.set()

    async def run(self) -> None:
        """Keep trying (and, once held, renewing) until cancelled; then release the lease."""
        try:
            while True:
                await self.keep()
                await asyncio.sleep(self._timing.renew_s)
        finally:
            await self.release()

    async def retire(self, why: str) -> None:
        """Hand the role over for good: this replica can no longer act on a verdict (its engine
        died, so it cannot load a canary to promote it) and must not keep others from deciding."""
        self._retired = True
        await self.release(why)

    async def release(self, why: str = "it is shutting down") -> None:
        """Stop deciding at once, then free the lease so another replica takes over without the TTL."""
        lease = self._lease
        if lease is None:
            return
        self._drop(lease, f"{why}; released the lease", "released")
        try:
            await asyncio.to_thread(self._store.release_lease, lease)
        except Exception as exc:  # noqa: BLE001 - the lease then ends by its TTL instead
            log.warning("canary decider: releasing the lease failed (%s); another replica takes over at its TTL", exc)

    def _drop(self, lease: Lease, why: str, change: str) -> None:
        if self._lease is not lease:
            return  # already dropped, or a newer term
        self._lease, self._valid_until = None, 0.0
        self._held.clear()
        log.warning("canary decider: this replica (%s) is no longer the decider: %s", self.holder, why)
        self._metrics.canary_decider_handovers.labels(change).inc()
