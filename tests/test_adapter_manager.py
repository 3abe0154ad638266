"""The adapter manager's routing, lease and refusal logic, pure: a fake engine that records loads
and can be made to fail, over a real registry directory. What the real engine does with the
weights is tested in tests/test_hot_swap.py and tests/test_adapters_serving.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tuneloop.server.adapters import AdapterManager, canary_bucket
from tuneloop.server.engine import EngineDelta, EngineRequest, LoadedAdapter
from tuneloop.server.errors import FailedPrecondition, NotFound
from tuneloop.server.metrics import Metrics
from tuneloop.server.registry import AdapterRegistry

NAME = "support"


class FakeEngine:
    """Records adapter loads; `broken` keys fail to load, `silent` keys generate nothing."""

    max_model_len = 1024

    def __init__(self) -> None:
        self.loaded: dict[str, LoadedAdapter] = {}
        self.loads: list[str] = []
        self.broken: set[str] = set()
        self.silent: set[str] = set()
        self.load_gate = asyncio.Event()
        self.load_gate.set()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(m["content"] for m in messages)

    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        silent = request.adapter is not None and request.adapter.key in self.silent
        yield EngineDelta(0, "" if silent else "x", () if silent else (7,), None, "length", "", 0.0)

    async def abort(self, request_id: str) -> None:
        pass

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        self.loads.append(adapter.key)
        await self.load_gate.wait()
        if adapter.key in self.broken:
            raise FailedPrecondition(f"adapter {adapter.key} cannot be loaded: bad file")
        self.loaded[adapter.key] = adapter

    async def remove_adapter(self, adapter: LoadedAdapter) -> None:
        del self.loaded[adapter.key]

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def lora(tmp_path: Path, rank: int = 8) -> Path:
    d = tmp_path / f"lora-r{rank}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16}))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


@pytest.fixture
def env(tmp_path: Path) -> tuple[AdapterManager, AdapterRegistry, FakeEngine, Metrics]:
    reg = AdapterRegistry(tmp_path / "reg")
    engine, metrics = FakeEngine(), Metrics(CollectorRegistry())
    manager = AdapterManager(engine, reg, metrics, default_adapter=NAME, max_lora_rank=16, base_model="base@1")
    return manager, reg, engine, metrics


MANIFEST = {"base_model": "base@1"}


async def settle() -> None:
    """Lets the tasks the manager scheduled (unloads) run: yields to the loop, waits no time."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lease_keeps_its_version_across_a_swap_and_the_old_one_unloads_after_its_last_lease(
    env, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    manager, reg, engine, _ = env
    async with manager.lease("", "") as first:
        assert first.role == "base" and first.adapter is None  # nothing published: the base model
    reg.publish(NAME, lora(tmp_path), MANIFEST)
    await manager.sync()
    async with manager.lease("", "") as held:
        assert (held.ref.version, held.role) == ("v1", "stable")
        reg.publish(NAME, lora(tmp_path), MANIFEST)
        await manager.sync()
        async with manager.lease("", "") as newer:
            assert newer.ref.version == "v2"
        assert set(engine.loaded) == {f"{NAME}@v1", f"{NAME}@v2"}  # v1 still leased
    await settle()  # the unload the last lease scheduled
    assert set(engine.loaded) == {f"{NAME}@v2"}


async def test_concurrent_first_requests_load_a_version_once(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manager, reg, engine, _ = env
    reg.publish(NAME, lora(tmp_path), MANIFEST)
    engine.load_gate.clear()  # hold the load so every request arrives while it is in flight

    async def pinned() -> str:
        async with manager.lease(NAME, "v1") as lease:
            return lease.role

    tasks = [asyncio.create_task(pinned()) for _ in range(8)]
    while not engine.loads:
        await asyncio.sleep(0)
    engine.load_gate.set()
    assert await asyncio.gather(*tasks) == ["pinned"] * 8
    assert engine.loads == [f"{NAME}@v1"]


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("broken", "cannot be loaded"),
        ("silent", "produced no tokens"),
        ("rank", "max_lora_rank 16"),
        ("base", "trained on base model other@2"),
        ("reward", "is a reward model"),
    ],
)
async def test_a_version_the_server_cannot_serve_is_refused_and_the_old_one_keeps_serving(
    env, tmp_path: Path, setup: str, words: str
) -> None:  # type: ignore[no-untyped-def]
    manager, reg, engine, metrics = env
    reg.publish(NAME, lora(tmp_path), MANIFEST)
    await manager.sync()
    files, manifest = lora(tmp_path), dict(MANIFEST)
    if setup == "rank":
        files = lora(tmp_path, rank=32)
    elif setup == "base":
        manifest["base_model"] = "other@2"
    elif setup == "reward":
        manifest["kind"] = "reward"
    elif setup in ("broken", "silent"):
        getattr(engine, setup).add(f"{NAME}@v2")
    if setup == "reward":  # a reward entry never moves `current`: asking to serve it is refused
        reg.publish(NAME, files, manifest, channel=None)
        with pytest.raises(FailedPrecondition, match=words):
            await manager.switch(NAME, "v2")
    else:
        reg.publish(NAME, files, manifest)
        await manager.sync()
    assert words in manager.refusals(NAME)["v2"]
    async with manager.lease("", "") as lease:
        assert lease.ref.version == "v1"
    await settle()
    assert f"{NAME}@v2" not in engine.loaded  # nothing half-loaded stays behind
    assert (
        metrics.registry.get_sample_value("tuneloop_adapter_refused_total", {"adapter": NAME, "adapter_version": "v2"})
        == 1.0
    )
    await manager.sync()  # refused once: not retried on every poll
    assert engine.loads.count(f"{NAME}@v2") <= 1


async def test_canary_users_are_sticky_and_ending_the_canary_unloads_it(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manager, reg, engine, _ = env
    reg.publish(NAME, lora(tmp_path), MANIFEST)
    reg.publish(NAME, lora(tmp_path), MANIFEST, channel=None)
    await manager.set_canary(NAME, "v2", 0.3)
    users = [f"u{i}" for i in range(200)]
    served = {}
    for u in users:
        async with manager.lease("", "", u) as lease:
            served[u] = (lease.ref.version, lease.role)
    assert all(served[u] == (("v2", "canary") if canary_bucket(u, NAME) < 0.3 else ("v1", "stable")) for u in users)
    assert 0.2 < sum(v == "v2" for v, _ in served.values()) / len(users) < 0.4
    with pytest.raises(FailedPrecondition, match="serving traffic"):
        await manager.unload(NAME, "v2")
    assert (await manager.end_canary(NAME)).version == "v2"  # type: ignore[union-attr]
    await settle()
    assert set(engine.loaded) == {f"{NAME}@v1"}
    assert manager.canaries() == []


async def test_naming_an_adapter_with_nothing_accepted_is_not_found(env) -> None:  # type: ignore[no-untyped-def]
    manager, *_ = env
    with pytest.raises(NotFound):
        async with manager.lease("other", ""):
            pass
    async with manager.lease("", "") as lease:  # the default adapter before its first publish
        assert lease.role == "base"


async def test_a_shared_registry_that_stops_answering_refuses_nothing_and_is_followed_again(
    s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage of the object store (injected into a real registry on the session's S3 server)
    keeps the loaded version serving, is logged once, and refuses no version: the next poll after
    the store answers again swaps as if nothing happened."""
    from tuneloop.server.registry import RegistryUnavailable
    from tuneloop.server.registry.objectstore import ObjectStoreRegistry

    caplog.set_level(logging.INFO, logger="tuneloop.server.adapters")
    trainer = ObjectStoreRegistry.open(s3_url, tmp_path / "trainer")
    replica = ObjectStoreRegistry.open(s3_url, tmp_path / "replica")
    manager = AdapterManager(
        FakeEngine(), replica, Metrics(CollectorRegistry()), default_adapter=NAME, max_lora_rank=16, base_model="base@1"
    )
    trainer.publish(NAME, lora(tmp_path), MANIFEST)
    await manager.sync()
    trainer.publish(NAME, lora(tmp_path), MANIFEST)

    def down(*args: object) -> None:
        raise RegistryUnavailable("registry_url: connection refused")

    with monkeypatch.context() as outage:
        outage.setattr(replica.blobs, "download", down)  # v2's files cannot be fetched
        await manager.sync()
        outage.setattr(replica.blobs, "etag", down)  # and then not even the channels can be read
        await manager.sync()
        async with manager.lease("", "") as lease:
            assert lease.ref.version == "v1"
    assert manager.refusals(NAME) == {}
    assert caplog.text.count("adapter registry unreachable") == 1
    await manager.sync()
    async with manager.lease("", "") as lease:
        assert lease.ref.version == "v2"
    assert "adapter registry answers again" in caplog.text
