"""Which adapter version serves a request, and keeping the engine's loaded adapters in step with
the registry.

- Requests lease a version for their whole life: a swap never changes the version of a request
  that already started, and a replaced version is unloaded only once its last lease is returned.
- Loading is idempotent and serialised per version; a new `current` version is loaded and probed
  with a short generation before default traffic moves to it, so a broken adapter is refused
  while the old version keeps serving.
- A canary version can take a sticky share of default traffic (by user id). Canaries live in the
  registry like `current` does, so every replica routes the same users to the same canary, and a
  canary is loaded and probed before any user is sent to it, exactly like a new `current`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .domain import BASE, AdapterRef, SamplingSpec, new_id
from .engine import Engine, EngineRequest, LoadedAdapter, next_adapter_id
from .errors import FailedPrecondition, InvalidArgument, NotFound, TuneloopError
from .metrics import Metrics
from .registry import ACCEPTED, DEFAULT_CHANNEL, POLICY, AdapterVersion, CanaryEntry, Registry, RegistryUnavailable

log = logging.getLogger(__name__)

PROBE_PROMPT = "Hello"
# A one-token probe takes a fraction of a second even in a full batch; one that hangs must not
# hold the swap lock (and with it every swap and admin action) for ever.
PROBE_TIMEOUT_S = 60.0


@dataclass
class _Slot:
    """A version loaded in the engine, with the number of requests using it."""

    version: AdapterVersion
    adapter: LoadedAdapter
    leases: int = 0
    served: bool = False  # has any request used it yet (for publish-to-first-served)
    probed: bool = False  # passed its probe generation (once per load is enough)


@dataclass
class Route:
    """Where default traffic for one adapter name goes."""

    stable: AdapterVersion | None = None  # None: nothing accepted yet, the base model serves
    stable_published_at: float | None = None
    canary: AdapterVersion | None = None
    canary_share: float = 0.0
    canary_started_at: float | None = None
    canary_auto_decide: bool = False


@dataclass(frozen=True)
class Lease:
    ref: AdapterRef
    adapter: LoadedAdapter | None
    role: str  # "stable", "canary", "pinned" or "base"


def canary_bucket(user_id: str, name: str) -> float:
    """A stable number in [0, 1) per (user, adapter): the same user always lands in the same arm."""
    digest = hashlib.blake2b(f"{name}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class AdapterManager:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        metrics: Metrics,
        *,
        default_adapter: str = "",
        max_lora_rank: int = 16,
        base_model: str = "",
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._metrics = metrics
        self.default_adapter = "" if default_adapter == BASE else default_adapter
        self._max_rank = max_lora_rank
        self._base_model = base_model  # fingerprint of the served base; "" skips the check
        self._slots: dict[str, _Slot] = {}
        self._retiring: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._routes: dict[str, Route] = {}
        self._refused: dict[str, str] = {}  # "name@version" -> why this server refused it
        self._share_labels: dict[str, set[str]] = {}  # traffic_share label sets in use, per name
        self._swap_lock = asyncio.Lock()
        self._registry_unreachable = False
        self._folded_labels: tuple[str, str] | None = None
        if hasattr(engine, "serve_folded"):
            engine.on_fold = self._observe_fold  # type: ignore[attr-defined]

    # -- per request ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, name: str, version: str, user_id: str = "") -> AsyncIterator[Lease]:
        """Pick the version for one request and hold it loaded until the request ends."""
        lease = await self._choose(name, version, user_id)
        slot = self._slots.get(lease.adapter.key) if lease.adapter else None
        if slot is not None:
            slot.leases += 1
            if not slot.served:
                slot.served = True
                self._observe_first_served(slot)
        try:
            yield lease
        finally:
            if slot is not None:
                slot.leases -= 1
                if slot.leases == 0 and slot.adapter.key in self._retiring:
                    await self._unload(slot.adapter.key)

    async def _choose(self, name: str, version: str, user_id: str) -> Lease:
        if name == BASE:
            if version and version != BASE:
                raise InvalidArgument("the base model has no versions; leave adapter.version empty")
            return Lease(AdapterRef(), None, "base")
        if name and version:
            # In a thread: a version not yet on this host is fetched from a shared registry first.
            found = await asyncio.to_thread(self._registry.get, name, version)
            return Lease(AdapterRef(found.name, found.version), await self._ensure_loaded(found), "pinned")
        explicit = bool(name)
        name = name or self.default_adapter
        if not name:
            return Lease(AdapterRef(), None, "base")
        route = self._routes.get(name)
        if route is None:
            route = await self._adopt(name, explicit)
        if route.canary is not None and canary_bucket(user_id or new_id("anon"), name) < route.canary_share:
            return Lease(AdapterRef(name, route.canary.version), await self._ensure_loaded(route.canary), "canary")
        if route.stable is None:
            if explicit:
                raise NotFound(f"adapter {name} has no accepted version to serve yet")
            return Lease(AdapterRef(), None, "base")
        return Lease(AdapterRef(name, route.stable.version), await self._ensure_loaded(route.stable), "stable")

    async def _adopt(self, name: str, explicit: bool) -> Route:
        """First request for a name: route it to the registry's `current` version."""
        async with self._swap_lock:
            return await self._adopt_locked(name, explicit)

    async def _adopt_locked(self, name: str, explicit: bool) -> Route:
        if name in self._routes:
            return self._routes[name]
        try:
            found = await asyncio.to_thread(self._registry.resolve, name)
        except NotFound:
            if explicit:
                raise
            found = None  # the default adapter before its first publish: the base model serves
        route = Route(stable=found if found is not None and found.status == ACCEPTED else None)
        if route.stable is not None:
            await self._ensure_loaded(route.stable)
        self._routes[name] = route
        self._update_fast_path()
        return route

    def _update_fast_path(self) -> None:
        """Tell an engine with a fast path (server/fast_path.py) which version to fold into its
        weights: the one carrying the default adapter's traffic, or none."""
        serve_folded = getattr(self._engine, "serve_folded", None)
        if serve_folded is None:
            return
        route = self._routes.get(self.default_adapter) if self.default_adapter else None
        slot = self._slots.get(f"{route.stable.name}@{route.stable.version}") if route and route.stable else None
        serve_folded(slot.adapter if slot is not None else None)

    # -- loading -------------------------------------------------------------------------------
    def _check_servable(self, found: AdapterVersion) -> None:
        """Refuse versions this server cannot serve, with the reason; raises FailedPrecondition."""
        key = f"{found.name}@{found.version}"
        if found.kind != POLICY:
            raise FailedPrecondition(
                f"adapter {key} is a {found.kind} model (it scores completions for the trainer); only policy "
                "adapters can serve requests"
            )
        if found.rank is not None and found.rank > self._max_rank:
            raise FailedPrecondition(
                f"adapter {key} has rank {found.rank}, above this server's max_lora_rank {self._max_rank}"
            )
        if self._base_model and found.base_model and found.base_model != self._base_model:
            raise FailedPrecondition(
                f"adapter {key} was trained on base model {found.base_model}, but this server serves {self._base_model}"
            )

    async def _ensure_loaded(self, found: AdapterVersion) -> LoadedAdapter:
        key = f"{found.name}@{found.version}"
        slot = self._slots.get(key)
        if slot is not None:
            self._retiring.discard(key)  # back in use (e.g. rolled back to)
            return slot.adapter
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._slots:  # loaded by the request we waited behind
                return self._slots[key].adapter
            self._check_servable(found)
            adapter = LoadedAdapter(key=key, int_id=next_adapter_id(), path=str(found.path))
            await self._engine.add_adapter(adapter)
            self._slots[key] = _Slot(found, adapter)
            log.info("loaded adapter %s from %s", key, found.path)
            return adapter

    async def _probe(self, adapter: LoadedAdapter) -> None:
        """A one-token greedy generation through the new adapter: the prefill runs every LoRA layer,
        so a version that loads but cannot run fails here, before any user request reaches it."""
        request = EngineRequest(
            request_id=new_id("probe"),
            prompt_token_ids=self._engine.tokenize(PROBE_PROMPT),
            sampling=SamplingSpec(max_tokens=1, temperature=0.0),
            adapter=adapter,
        )
        produced = 0
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):  # cancelling aborts the engine request
                async for delta in self._engine.generate(request):
                    produced += len(delta.token_ids)
        except TimeoutError:
            raise FailedPrecondition(
                f"adapter {adapter.key}'s probe generation did not finish within {PROBE_TIMEOUT_S:.0f} s"
            ) from None
        if produced == 0:
            raise FailedPrecondition(f"adapter {adapter.key} produced no tokens in its probe generation")

    async def _unload(self, key: str) -> None:
        # Re-check: between scheduling and running, a rollback may have put the version back in use.
        slot = self._slots.get(key)
        if slot is None or key not in self._retiring or slot.leases > 0:
            return
        del self._slots[key]
        self._retiring.discard(key)
        try:
            await self._engine.remove_adapter(slot.adapter)
            log.info("unloaded adapter %s", key)
        except Exception:  # noqa: BLE001 - an unload failure must not fail the request that triggered it
            log.exception("unloading adapter %s failed", key)

    def _retire(self, version: AdapterVersion | None) -> None:
        """Unload a version once no request holds it (now, if none does)."""
        if version is None:
            return
        key = f"{version.name}@{version.version}"
        if any(self._uses(r, key) for r in self._routes.values()):
            return
        slot = self._slots.get(key)
        if slot is None:
            return
        self._retiring.add(key)
        if slot.leases == 0:
            asyncio.get_running_loop().create_task(self._unload(key))

    @staticmethod
    def _uses(route: Route, key: str) -> bool:
        return any(v is not None and f"{v.name}@{v.version}" == key for v in (route.stable, route.canary))

    def _observe_fold(self, folded: str, seconds: float, ok: bool, preempted: int) -> None:
        m = self._metrics
        m.folds.labels("failed" if not ok else "folded" if folded else "unfolded").inc()
        m.fold_seconds.observe(seconds)
        m.fold_preempted.inc(preempted)
        if self._folded_labels is not None:
            m.folded.remove(*self._folded_labels)
            self._folded_labels = None
        if folded:
            name, _, version = folded.partition("@")
            self._folded_labels = (name, version)
            m.folded.labels(name, version).set(1)

    def _observe_first_served(self, slot: _Slot) -> None:
        route = self._routes.get(slot.version.name)
        if route is not None and route.stable is slot.version and route.stable_published_at:
            elapsed = max(0.0, time.time() - route.stable_published_at)
            self._metrics.publish_to_first_served.observe(elapsed)
            log.info("%s took its first request %.2f s after it was published", slot.adapter.key, elapsed)

    # -- swapping ------------------------------------------------------------------------------
    async def prepare(self, name: str, version: str) -> AdapterVersion:
        """Load and probe a version (once per load) without routing anything to it. A version
        that cannot be served is recorded as refused (with a log line and a metric), unloaded,
        and the error raised; one that can is cleared of an earlier refusal."""
        key = f"{name}@{version}"
        found: AdapterVersion | None = None
        try:
            found = await asyncio.to_thread(self._registry.get, name, version)
            if found.status != ACCEPTED:
                raise FailedPrecondition(f"adapter {key} was rejected by its gate and cannot be served")
            adapter = await self._ensure_loaded(found)
            slot = self._slots.get(key)
            if slot is None or not slot.probed:
                await self._probe(adapter)
                if slot is not None:
                    slot.probed = True
        except RegistryUnavailable:
            raise  # the shared store did not answer: nothing is wrong with the version, try it again
        except TuneloopError as exc:
            self._refused[key] = str(exc)
            self._metrics.swaps.labels("refused").inc()
            self._metrics.adapter_refused.labels(name, version).inc()
            route = self._routes.get(name)
            log.error("refused adapter %s: %s; serving stays on %s", key, exc, _ref(route.stable if route else None))
            if found is not None and not (route and self._uses(route, key)):
                self._retire(found)
            raise
        self._refused.pop(key, None)
        return found

    async def switch(self, name: str, version: str, *, published_at: float | None = None) -> AdapterVersion:
        """Load, probe and then route default traffic for `name` to `version` (one atomic step)."""
        async with self._swap_lock:
            route = self._routes.setdefault(name, Route())
            if route.stable is not None and route.stable.version == version:
                return route.stable
            found = await self.prepare(name, version)
            old, route.stable = route.stable, found
            route.stable_published_at = published_at
            if route.canary is not None and route.canary.version == version:
                route.canary, route.canary_share, route.canary_started_at = None, 0.0, None
                route.canary_auto_decide = False
            self._metrics.swaps.labels("ok").inc()
            self._set_info(name, route)
            log.info("default traffic for %s: %s -> %s", name, _ref(old), version)
            self._retire(old)
            self._update_fast_path()
            return found

    async def set_canary(
        self, name: str, version: str, share: float, *, started_at: float | None = None, auto_decide: bool = False
    ) -> None:
        """Route `share` of default traffic for `name` to `version` (loaded and probed first).
        `started_at` dates the canary's evidence; the registry's start time, when it came from there."""
        if not 0.0 <= share <= 1.0:
            raise InvalidArgument(f"canary share must be in [0, 1], got {share}")
        await asyncio.to_thread(self._registry.get, name, version)  # NOT_FOUND before anything else
        async with self._swap_lock:
            # First use of this name: its registry `current` version is the stable side.
            route = await self._adopt_locked(name, explicit=False)
            if route.stable is not None and route.stable.version == version:
                raise FailedPrecondition(
                    f"{name}@{version} already serves default traffic; a canary must be another version"
                )
            found = await self.prepare(name, version)
            old = route.canary
            route.canary, route.canary_share, route.canary_auto_decide = found, share, auto_decide
            if old is None or old.version != version or started_at is not None:
                route.canary_started_at = started_at if started_at is not None else time.time()
            self._set_info(name, route)
            log.info("canary for %s: %s at %.0f%% of default traffic", name, version, share * 100)
            if old is not None and old.version != version:
                self._retire(old)

    async def end_canary(self, name: str, expected: str = "") -> AdapterVersion | None:
        """Stop the canary (only if it is still `expected`, when given); returns the ended version."""
        async with self._swap_lock:
            route = self._routes.get(name)
            if route is None or route.canary is None or (expected and route.canary.version != expected):
                return None
            old, route.canary, route.canary_share, route.canary_started_at = route.canary, None, 0.0, None
            route.canary_auto_decide = False
            self._set_info(name, route)
            self._retire(old)
            return old

    async def unload(self, name: str, version: str) -> None:
        key = f"{name}@{version}"
        route = self._routes.get(name)
        if route is not None and self._uses(route, key):
            raise FailedPrecondition(f"{key} is serving traffic; promote or roll back to another version first")
        if key not in self._slots:
            raise NotFound(f"{key} is not loaded")
        slot = self._slots[key]
        self._retiring.add(key)
        if slot.leases == 0:
            await self._unload(key)

    async def sync(self) -> None:
        """Follow the registry: when a name's `current` channel moved, switch to it; when its
        canary started, changed or ended, do the same here."""
        names = set(self._routes)
        if self.default_adapter:
            names.add(self.default_adapter)
        unreachable: RegistryUnavailable | None = None
        for name in sorted(names):
            try:
                await self._follow_current(name)
                await self._follow_canary(name)
            except RegistryUnavailable as exc:
                unreachable = exc  # serving stays as it is; the next poll tries again
            except TuneloopError:
                continue  # a refusal: logged and counted by prepare
            except Exception:  # noqa: BLE001 - one adapter's trouble must not stop the others' swaps
                log.exception("following the registry for adapter %s failed", name)
        # Said once when the registry stops answering and once when it answers again, not per poll.
        if unreachable is not None and not self._registry_unreachable:
            log.warning("adapter registry unreachable; serving stays as it is until it answers: %s", unreachable)
        elif unreachable is None and self._registry_unreachable:
            log.info("adapter registry answers again")
        self._registry_unreachable = unreachable is not None
        self._update_fast_path()

    async def _follow_current(self, name: str) -> None:
        # In a thread: on a shared registry a poll is a request to the object store.
        info = await asyncio.to_thread(self._registry.channel_info, name, DEFAULT_CHANNEL)
        if info is None:
            return
        version, updated_at = info
        route = self._routes.get(name)
        if route is not None and route.stable is not None and route.stable.version == version:
            return
        if f"{name}@{version}" in self._refused:
            return  # refused once; a later publish or an admin promote tries again
        try:
            await self.switch(name, version, published_at=updated_at)
        except TuneloopError:
            # Nothing of this name is served yet (a start, or its first publish): rather than the
            # bare base model, serve the newest version the channel pointed to that this server can.
            if (route is None or route.stable is None) and await self._fall_back(name, version):
                return
            raise
        self._metrics.adapter_fallback.labels(name).set(0)

    async def _fall_back(self, name: str, refused: str) -> bool:
        for older in reversed(await asyncio.to_thread(self._registry.history, name)):
            if older == refused or f"{name}@{older}" in self._refused:
                continue
            try:
                await self.switch(name, older)
            except TuneloopError:
                continue  # refused too (logged and counted by prepare): try the one before
            log.warning(
                "current of %s points at %s, which this server refuses (%s); serving %s, the newest version of "
                "the channel it can serve, until current moves", name, refused, self._refused.get(f"{name}@{refused}"),
                older,
            )  # fmt: skip
            self._metrics.adapter_fallback.labels(name).set(1)
            return True
        return False

    async def _follow_canary(self, name: str) -> None:
        entry = await asyncio.to_thread(self._registry.canary, name)
        route = self._routes.get(name)
        live = route.canary if route is not None else None
        if entry is None:
            if live is not None:
                await self.end_canary(name, expected=live.version)
            return
        if route is not None and route.stable is not None and route.stable.version == entry.version:
            return  # promoted; the registry's canary entry is being cleared
        if route is not None and live is not None and self._same_canary(route, entry):
            return
        if f"{name}@{entry.version}" in self._refused:
            return
        try:
            await self.set_canary(
                name, entry.version, entry.share, started_at=entry.started_at, auto_decide=entry.auto_decide
            )
        except TuneloopError as exc:
            # No replica should send users to a version that cannot be served.
            await asyncio.to_thread(self._registry.end_canary, name, "refused", expected=entry.version, detail=str(exc))
            raise

    @staticmethod
    def _same_canary(route: Route, entry: CanaryEntry) -> bool:
        return (
            route.canary is not None
            and route.canary.version == entry.version
            and route.canary_share == entry.share
            and route.canary_started_at == entry.started_at
            and route.canary_auto_decide == entry.auto_decide
        )

    # -- reading -------------------------------------------------------------------------------
    def route(self, name: str) -> Route | None:
        return self._routes.get(name)

    def canaries(self) -> list[str]:
        """Names with a canary running on this server."""
        return sorted(n for n, r in self._routes.items() if r.canary is not None)

    def loaded(self) -> dict[str, int]:
        """Loaded versions and how many requests hold each."""
        return {k: s.leases for k, s in self._slots.items()}

    def refusals(self, name: str) -> dict[str, str]:
        """Versions of `name` this server refused, with why."""
        return {key.partition("@")[2]: why for key, why in self._refused.items() if key.partition("@")[0] == name}

    def _set_info(self, name: str, route: Route) -> None:
        m = self._metrics
        stable = route.stable.version if route.stable else BASE
        m.serving_version.labels(name).info({"version": stable, "canary": route.canary.version if route.canary else ""})
        share = route.canary_share if route.canary else 0.0
        for version in self._share_labels.pop(name, ()):
            m.traffic_share.remove(name, version)
        shares = {stable: 1.0 - share}
        if route.canary is not None:
            shares[route.canary.version] = share
        for version, value in shares.items():
            m.traffic_share.labels(name, version).set(value)
        self._share_labels[name] = set(shares)


def _ref(version: AdapterVersion | None) -> str:
    return version.version if version is not None else BASE


async def follow_registry(manager: AdapterManager, poll_s: float, stop: Callable[[], bool] = lambda: False) -> None:
    """The watcher loop: poll the registry's channels and swap when they move."""
    while not stop():
        try:
            await manager.sync()
        except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
            log.exception("adapter registry poll failed")
        await asyncio.sleep(poll_s)
