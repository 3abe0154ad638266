"""Operating adapters: listing, promotion, rollback, canaries, unloading; and the monitor that lets
live feedback promote or roll back a canary on its own.

Promotion, rollback and canaries load and probe the version on this server, then move the
registry (its `current` channel, or its canary entry), then switch this server: the registry stays
the source of truth (other replicas, and this one after a restart, follow it), and it never points
at a version this server just failed to serve. A canary the trainer started in the registry is
picked up the same way and judged by the same monitor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .adapters import AdapterManager
from .canary import CONTINUE, PROMOTE, ROLL_BACK, CanaryPolicy, Verdict, judge
from .decider import Decider
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .metrics import Metrics
from .registry import ACCEPTED, DEFAULT_CHANNEL, Registry, validate_name, version_number
from .store.base import Store, VersionFeedback

log = logging.getLogger(__name__)

# Asked right before an automatic canary decision is acted on; False vetoes it.
Fence = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class VersionView:
    version: str
    status: str
    parent_version: str
    created_at: float
    loaded: bool
    active_requests: int
    traffic_share: float
    role: str
    feedback: VersionFeedback
    metrics: dict[str, float]
    refusal: str


@dataclass(frozen=True)
class AdapterView:
    name: str
    current_version: str
    canary_version: str
    canary_share: float
    versions: list[VersionView]
    canary: Verdict | None
    auto_decide: bool


@dataclass
class _CanaryWatch:
    """The latest verdict on one canary run (a version and its start time)."""

    version: str
    started_at: float
    verdict: Verdict | None = None


@dataclass
class AdminService:
    adapters: AdapterManager
    registry: Registry
    store: Store
    metrics: Metrics
    policy: CanaryPolicy = field(default_factory=CanaryPolicy)
    _watches: dict[str, _CanaryWatch] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------------------
    async def list(self, name: str = "") -> list[AdapterView]:
        if name:
            validate_name(name)
        # Every registry call is a file read here, and a network request on a shared registry:
        # off the event loop, which serves generation meanwhile.
        known = await asyncio.to_thread(self.registry.names)
        names = [name] if name else known
        if name and name not in known:
            raise NotFound(f"no adapter named {name} in the registry")
        views = []
        for n in sorted(names):
            # Serving state is read here, on the event loop that changes it; only the registry
            # and store reads go to a thread.
            route = self.adapters.route(n)
            stable = route.stable.version if route and route.stable else ""
            canary = route.canary.version if route and route.canary else ""
            share = route.canary_share if route and route.canary else 0.0
            auto = bool(route and route.canary and route.canary_auto_decide)
            snapshot = (stable, canary, share, auto, self.adapters.loaded(), self.adapters.refusals(n))
            views.append(await asyncio.to_thread(self._view, n, *snapshot))
        return views

    def _view(
        self,
        name: str,
        stable: str,
        canary: str,
        share: float,
        auto_decide: bool,
        loaded: dict[str, int],
        refusals: dict[str, str],
    ) -> AdapterView:
        feedback = self.store.version_feedback(name)
        versions = []
        for v in self.registry.versions(name):
            key = f"{name}@{v.version}"
            role = "stable" if v.version == stable else "canary" if v.version == canary else ""
            traffic = (1.0 - share) if role == "stable" else share if role == "canary" else 0.0
            metrics = {k: float(x) for k, x in (v.manifest.get("metrics") or {}).items() if isinstance(x, (int, float))}
            versions.append(
                VersionView(
                    version=v.version,
                    status=v.status,
                    parent_version=v.parent_version or "",
                    created_at=float(v.manifest.get("created_at", 0.0)),
                    loaded=key in loaded,
                    active_requests=loaded.get(key, 0),
                    traffic_share=traffic,
                    role=role,
                    feedback=feedback.get(v.version, VersionFeedback()),
                    metrics=metrics,
                    refusal=refusals.get(v.version, ""),
                )
            )
        watch = self._watches.get(name)
        return AdapterView(
            name=name,
            current_version=stable,
            canary_version=canary,
            canary_share=share,
            versions=versions,
            canary=watch.verdict if watch and watch.version == canary else None,
            auto_decide=auto_decide,
        )

    # -- acting --------------------------------------------------------------------------------
    async def promote(self, name: str, version: str) -> AdapterView:
        found = await asyncio.to_thread(self.registry.get, name, version)
        if found.status != ACCEPTED:
            raise FailedPrecondition(f"{name}@{version} was rejected by its gate and cannot be served")
        # Load and probe here before moving the channel every replica follows.
        await self.adapters.prepare(name, version)
        await asyncio.to_thread(self.registry.set_channel, name, DEFAULT_CHANNEL, version)
        # A canary of this version has earned its traffic: its trial ends here.
        await asyncio.to_thread(self.registry.end_canary, name, "promoted", expected=version)
        await self.adapters.switch(name, version)
        self._watches.pop(name, None)
        return (await self.list(name))[0]

    async def rollback(self, name: str, to_version: str = "") -> AdapterView:
        current = await asyncio.to_thread(self.registry.channel, name, DEFAULT_CHANNEL)
        if current is None:
            raise FailedPrecondition(f"adapter {name} has no current version to roll back from")
        target = to_version or await asyncio.to_thread(self._previous, name, current)
        if target == current:
            raise FailedPrecondition(f"{name}@{current} is already current")
        log.warning("rolling back %s: %s -> %s", name, current, target)
        return await self.promote(name, target)

    def _previous(self, name: str, current: str) -> str:
        """The newest accepted version that served before `current` and is older than it, so
        repeated rollbacks walk back v3 -> v2 -> v1 instead of toggling."""
        accepted = {v.version for v in self.registry.versions(name) if v.status == ACCEPTED}
        for v in reversed(self.registry.history(name, DEFAULT_CHANNEL)):
            if v in accepted and version_number(v) < version_number(current):
                return v
        raise FailedPrecondition(f"adapter {name} has no earlier served version to roll back to from {current}")

    async def set_canary(self, name: str, version: str, share: float, auto_decide: bool) -> AdapterView:
        if share == 0.0:
            await asyncio.to_thread(self.registry.end_canary, name, "stopped")
            await self.adapters.end_canary(name)
            self._watches.pop(name, None)
        else:
            if not 0.0 < share <= 1.0:
                raise InvalidArgument(f"canary share must be in [0, 1], got {share}")
            await self.adapters.prepare(name, version)
            entry = await asyncio.to_thread(self.registry.start_canary, name, version, share, auto_decide=auto_decide)
            await self.adapters.set_canary(
                name, version, share, started_at=entry.started_at, auto_decide=entry.auto_decide
            )
        return (await self.list(name))[0]

    async def unload(self, name: str, version: str) -> AdapterView:
        validate_name(name)
        version_number(version)
        await self.adapters.unload(name, version)
        return (await self.list(name))[0]

    # -- the canary monitor --------------------------------------------------------------------
    async def check_canaries(self, fence: Fence | None = None) -> None:
        """One pass of the monitor: update each running canary's verdict; act on it when allowed.

        `fence`, when given, is awaited right before each act and vetoes it by returning False
        (this replica is no longer the one that decides)."""
        for name in self.adapters.canaries():
            try:
                await self._check_canary(name, fence)
            except Exception:  # noqa: BLE001 - one canary's trouble must not stop the others' checks
                log.exception("canary monitor: checking %s failed", name)
        for name in set(self._watches) - set(self.adapters.canaries()):
            self._watches.pop(name, None)

    def forget_verdicts(self) -> None:
        """Drop the verdicts held here: another replica judges the canaries now, so these go stale."""
        self._watches.clear()

    async def _check_canary(self, name: str, fence: Fence | None) -> None:
        route = self.adapters.route(name)
        if route is None or route.canary is None or route.canary_started_at is None:
            return
        stable = route.stable.version if route.stable else ""
        canary, started = route.canary.version, route.canary_started_at
        watch = self._watches.get(name)
        if watch is None or (watch.version, watch.started_at) != (canary, started):
            watch = self._watches[name] = _CanaryWatch(canary, started)
        evidence = await asyncio.to_thread(self.store.canary_evidence, name, canary, stable, started)
        # The read took time: act only if an operator did not change this canary meanwhile.
        route = self.adapters.route(name)
        if (
            self._watches.get(name) is not watch
            or route is None
            or route.canary is None
            or (route.canary.version, route.canary_started_at) != (canary, started)
            or (route.stable.version if route.stable else "") != stable
        ):
            return
        v = watch.verdict = judge(evidence.canary_thumbs, evidence.stable_thumbs, evidence.head_to_head, self.policy)
        if not route.canary_auto_decide or v.decision == CONTINUE:
            return
        if fence is not None and not await fence():
            log.info("canary %s@%s: verdict %s left to the canary decider", name, canary, v.decision)
            return
        # This server follows the registry with a lag: the run judged must still be the one there.
        entry = await asyncio.to_thread(self.registry.canary, name)
        if entry is None or (entry.version, entry.started_at) != (canary, started):
            return
        self._watches.pop(name, None)
        against = f"{stable or 'base'} (LLR {v.llr:.2f}, {v.wins}/{v.losses})"
        if v.decision == ROLL_BACK:
            if await self._end(name, canary, "rolled_back", f"worse than {against}"):
                log.warning("canary %s@%s is worse than %s: rolled back", name, canary, against)
        elif v.decision == PROMOTE:
            await self._promote_canary(name, canary, f"not worse than {against}")

    async def _promote_canary(self, name: str, canary: str, detail: str) -> None:
        """Promote a canary that passed its test. Unlike `promote` (an operator's call, which
        moves `current` first), the canary's trial is ended first: ending it is the registry's
        compare-and-set, so of two replicas that ever both try, only one moves `current`."""
        try:
            await self.adapters.prepare(name, canary)
        except Exception as exc:
            # It cannot be served any more (e.g. its files went away): stop sending users to it.
            log.exception("canary %s@%s passed its test but could not be promoted; ending the canary", name, canary)
            await self._end(name, canary, "promote_failed", f"{type(exc).__name__}: {exc}")
            return
        if not await self._claim(name, canary, "promoted", detail):
            return
        try:
            await asyncio.to_thread(self.registry.set_channel, name, DEFAULT_CHANNEL, canary)
        except Exception:
            log.exception(
                "canary %s@%s passed its test and its trial ended, but 'current' could not be moved to it; "
                "promote it by hand (tuneloop adapters promote)",
                name,
                canary,
            )
            await self.adapters.end_canary(name, expected=canary)
            self.metrics.canary_decisions.labels(name, "promote_failed").inc()
            return
        await self.adapters.switch(name, canary)
        log.info("canary %s@%s is %s: promoted", name, canary, detail)
        self.metrics.canary_decisions.labels(name, "promoted").inc()

    async def _end(self, name: str, canary: str, outcome: str, detail: str) -> bool:
        """End a canary everywhere: in the registry (so every replica and the trainer see the
        verdict), then on this server. False if the registry's canary was no longer `canary`."""
        ended = await self._claim(name, canary, outcome, detail)
        await self.adapters.end_canary(name, expected=canary)
        if ended:
            self.metrics.canary_decisions.labels(name, outcome).inc()
        return ended

    async def _claim(self, name: str, canary: str, outcome: str, detail: str) -> bool:
        """Record `outcome` for the running canary in the registry, only if it still is `canary`."""
        ended = await asyncio.to_thread(self.registry.end_canary, name, outcome, expected=canary, detail=detail)
        if ended is None:
            log.info("canary %s@%s had already ended in the registry; %s not recorded", name, canary, outcome)
        return ended is not None


async def monitor_canaries(admin: AdminService, every_s: float, decider: Decider) -> None:
    """Run the canary test every `every_s` while this replica is the canary decider; the other
    replicas only follow the registry, where the decider's verdicts land."""
    while True:
        await asyncio.sleep(every_s)
        if not decider.holds():
            admin.forget_verdicts()
            continue
        try:
            await admin.check_canaries(fence=decider.confirm)
        except Exception:  # noqa: BLE001 - the monitor must outlive one bad pass
            log.exception("canary monitor pass failed")
