"""Which adapter version serves a request, and getting it into the engine.

Selectors are resolved against the adapter registry; loading is idempotent and serialised per
adapter version, so concurrent first requests for the same version load it once, and a version
that vLLM refuses is reported to the caller instead of failing inside the batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from .domain import BASE, AdapterRef
from .engine import Engine, LoadedAdapter
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)


class AdapterManager:
    def __init__(
        self, engine: Engine, registry: AdapterRegistry, *, default_adapter: str = "", max_lora_rank: int = 16
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._default = default_adapter
        self._max_rank = max_lora_rank
        self._loaded: dict[str, LoadedAdapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)

    async def select(self, name: str, version: str) -> tuple[AdapterRef, LoadedAdapter | None]:
        """Resolve a request's selector to a version and make sure the engine has it loaded."""
        name = name or self._default
        if not name or name == BASE:
            if version and version != BASE:
                raise InvalidArgument("the base model has no versions; leave adapter.version empty")
            return AdapterRef(), None
        found = self._registry.resolve(name, version)  # NotFound names what is missing
        if found.status != "accepted" and not version:
            raise NotFound(f"adapter {name} has no accepted version to serve")
        return AdapterRef(found.name, found.version), await self._ensure_loaded(found)

    async def _ensure_loaded(self, found: AdapterVersion) -> LoadedAdapter:
        key = f"{found.name}@{found.version}"
        if key in self._loaded:
            return self._loaded[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._loaded:  # loaded by the request we waited behind
                return self._loaded[key]
            if found.rank is not None and found.rank > self._max_rank:
                raise FailedPrecondition(
                    f"adapter {key} has rank {found.rank}, above this server's max_lora_rank {self._max_rank}"
                )
            adapter = LoadedAdapter(key=key, int_id=next(self._ids), path=str(found.path))
            await self._engine.add_adapter(adapter)
            self._loaded[key] = adapter
            log.info("loaded adapter %s from %s", key, found.path)
            return adapter
