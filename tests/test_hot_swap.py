"""Publishing, rollback, canary split and refusal of broken adapters, on the real engine."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from tuneloop.server.adapters import canary_bucket
from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint
from tuneloop.v1 import admin_pb2 as apb
from tuneloop.v1 import admin_pb2_grpc as apb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

NAME = "default"  # the adapter the server routes requests that name none to
T = TypeVar("T")


@pytest.fixture
async def swap_env(make_server, model_dir: Path):  # type: ignore[no-untyped-def]
    server = await make_server(default_adapter=NAME)
    reg = AdapterRegistry(server.config.adapter_dir)
    manifest = {"base_model": base_model_fingerprint(model_dir), "metrics": {"heldout_accuracy": 0.8}}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield server, reg, manifest, pb_grpc.GenerationServiceStub(ch), apb_grpc.AdminServiceStub(ch)


async def _version_of_next(stub: pb_grpc.GenerationServiceStub, user: str = "") -> str:
    r = await stub.Generate(
        pb.GenerateRequest(
            prompt="Hi", sampling=pb.SamplingParams(max_tokens=1), caller=pb.CallerMetadata(user_id=user)
        )
    )
    return r.completions[0].adapter.version


async def _eventually(probe: Callable[[], Awaitable[T]], what: str, timeout: float = 30.0) -> T:
    """Waits for a condition the server reaches on its own (a registry poll, an unload), checking
    it every 50 ms: the timeout only bounds a failure, no step waits a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def _wait_version(stub: pb_grpc.GenerationServiceStub, version: str) -> None:
    async def serves() -> bool:
        return await _version_of_next(stub) == version

    await _eventually(serves, f"default traffic on {version}")


async def _versions(admin) -> dict[str, apb.VersionState]:  # type: ignore[no-untyped-def]
    return {v.version: v for v in (await admin.ListAdapters(apb.ListAdaptersRequest(name=NAME))).adapters[0].versions}


async def test_publish_during_streams_then_rollback(swap_env, lora_dirs) -> None:
    server, reg, manifest, stub, admin = swap_env
    assert await _version_of_next(stub) == "base"  # nothing published yet: the base model serves

    started = [asyncio.Event() for _ in range(8)]

    async def stream(i: int) -> tuple[str, str]:
        req = pb.GenerateRequest(
            prompt=f"Tell me a story about {i} cats.",
            sampling=pb.SamplingParams(max_tokens=48, temperature=1.0, seed=i),
        )
        final = None
        async for msg in stub.GenerateStream(req):
            started[i].set()  # its first tokens came from the version it started on
            if msg.HasField("completion"):
                final = msg.completion
        assert final is not None
        return final.adapter.name, final.adapter.version

    running = [asyncio.create_task(stream(i)) for i in range(8)]
    await asyncio.gather(*(e.wait() for e in started))
    reg.publish(NAME, lora_dirs["r8a"], manifest)
    await _wait_version(stub, "v1")
    results = await asyncio.gather(*running)  # none failed
    assert {v for _, v in results} <= {"base", "v1"}
    assert ("base", "base") in results  # those that started before the swap finished on base

    reg.publish(NAME, lora_dirs["r8b"], manifest)
    await _wait_version(stub, "v2")
    state = await admin.Rollback(apb.RollbackRequest(name=NAME))
    assert state.current_version == "v1"
    assert await _version_of_next(stub) == "v1"
    assert reg.channel(NAME) == "v1"  # the registry moved too, so other replicas follow
    # v2 is unloaded once nothing uses it.
    async def v2_unloaded() -> dict[str, apb.VersionState] | None:
        listed = await _versions(admin)
        return None if listed["v2"].loaded else listed

    listed = await _eventually(v2_unloaded, "v2 unloaded")
    assert listed["v1"].role == "stable" and listed["v1"].traffic_share == 1.0 and listed["v1"].loaded
    assert not listed["v2"].loaded and listed["v2"].role == ""
    assert listed["v1"].metrics["heldout_accuracy"] == pytest.approx(0.8)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.Rollback(apb.RollbackRequest(name=NAME))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "roll back" in err.value.details()


async def test_canary_split_is_sticky_and_proportional(swap_env, lora_dirs) -> None:
    server, reg, manifest, stub, admin = swap_env
    reg.publish(NAME, lora_dirs["r8a"], manifest)
    await _wait_version(stub, "v1")
    reg.publish(NAME, lora_dirs["r8b"], manifest, channel=None)  # published, not moved to current
    state = await admin.SetCanary(apb.SetCanaryRequest(name=NAME, version="v2", share=0.25))
    assert state.canary_version == "v2" and state.canary_share == pytest.approx(0.25)

    users = [f"user-{i}" for i in range(120)]
    sem = asyncio.Semaphore(16)

    async def version_for(u: str) -> str:
        async with sem:
            return await _version_of_next(stub, u)

    first = await asyncio.gather(*(version_for(u) for u in users))
    again = await asyncio.gather(*(version_for(u) for u in users[:30]))
    assert again == first[:30]  # sticky per user
    expected = ["v2" if canary_bucket(u, NAME) < 0.25 else "v1" for u in users]
    assert first == expected
    share = first.count("v2") / len(first)
    assert 0.15 <= share <= 0.35

    state = await admin.SetCanary(apb.SetCanaryRequest(name=NAME, share=0.0))
    assert state.canary_version == ""
    assert {await _version_of_next(stub, u) for u in users[:20]} == {"v1"}


async def test_broken_adapters_are_refused_and_serving_goes_on(
    swap_env, lora_dirs, tmp_path: Path, make_server
) -> None:  # type: ignore[no-untyped-def]
    server, reg, manifest, stub, admin = swap_env
    reg.publish(NAME, lora_dirs["r8a"], manifest)
    await _wait_version(stub, "v1")
    refused_before = _refused_total(server)

    broken = tmp_path / "broken"
    shutil.copytree(lora_dirs["r8b"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cases = [
        ("v2", broken, manifest, "cannot be loaded"),  # files present but unreadable
        ("v3", lora_dirs["r32"], manifest, "max_lora_rank"),  # rank 32 > 16
        ("v4", lora_dirs["r8b"], {**manifest, "base_model": "another-model@00"}, "base model"),
    ]
    for version, files, man, words in cases:
        assert reg.publish(NAME, files, man).version == version

        async def refused(version: str = version) -> str:
            listed = await _versions(admin)
            return listed[version].refusal if version in listed else ""

        assert words in await _eventually(refused, f"{version} refused"), version
        assert await _version_of_next(stub) == "v1", version
    assert _refused_total(server) - refused_before == 3
    # A good version published after the broken ones is still picked up.
    reg.publish(NAME, lora_dirs["r8b"], manifest)
    await _wait_version(stub, "v5")
    # Promoting a broken version is refused before the channel every replica follows moves.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.Promote(apb.PromoteRequest(name=NAME, version="v2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be loaded" in err.value.details()
    assert reg.channel(NAME) == "v5" and await _version_of_next(stub) == "v5"
    for bad in (apb.UnloadRequest(name="Not A Name", version="v1"), apb.UnloadRequest(name=NAME, version="7")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.Unload(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListAdapters(apb.ListAdaptersRequest(name="../etc"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A replica that starts while current points at a version it refuses serves the newest version
    # the channel pointed to that it can (v5 here, not v2-v4, not the base model), and says so.
    assert reg.publish(NAME, lora_dirs["r32"], manifest).version == "v6" and reg.channel(NAME) == "v6"
    restarted = await make_server(default_adapter=NAME)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as ch:
        await _wait_version(pb_grpc.GenerationServiceStub(ch), "v5")
    assert restarted.metrics.registry.get_sample_value("tuneloop_adapter_serving_fallback", {"adapter": NAME}) == 1.0


def _refused_total(server) -> float:  # type: ignore[no-untyped-def]
    return sum(
        s.value for m in server.metrics.adapter_refused.collect() for s in m.samples if s.name.endswith("_total")
    )


async def _judge_traffic(stub, feedback, users: list[str], thumbs_for: dict[str, list[bool]]) -> None:  # type: ignore[no-untyped-def]
    """Each user asks once; the user's thumbs on the answer depend on the version that served it
    (cycling through `thumbs_for[version]`)."""
    from tuneloop.v1 import feedback_pb2 as fpb

    seen: dict[str, int] = {}
    sem = asyncio.Semaphore(16)

    async def one(u: str) -> None:
        async with sem:
            r = await stub.Generate(
                pb.GenerateRequest(
                    prompt="Hi", sampling=pb.SamplingParams(max_tokens=1), caller=pb.CallerMetadata(user_id=u)
                )
            )
        c = r.completions[0]
        pattern = thumbs_for[c.adapter.version]
        i = seen.get(c.adapter.version, 0)
        seen[c.adapter.version] = i + 1
        up = pattern[i % len(pattern)]
        await feedback.SubmitFeedback(
            fpb.FeedbackEvent(
                rater_id=u,
                thumbs=fpb.ThumbsFeedback(completion_id=c.completion_id, value=fpb.THUMB_UP if up else fpb.THUMB_DOWN),
            )
        )

    await asyncio.gather(*(one(u) for u in users))


async def _canary_outcome(admin) -> apb.AdapterState:  # type: ignore[no-untyped-def]
    async def decided() -> apb.AdapterState | None:
        state = (await admin.ListAdapters(apb.ListAdaptersRequest(name=NAME))).adapters[0]
        return None if state.canary_version else state

    return await _eventually(decided, "the canary monitor's decision")


@pytest.mark.parametrize(
    ("canary_thumbs", "stable_thumbs", "expected_current"),
    [
        ([False], [True], "v1"),  # clearly worse: rolled back, v1 stays
        ([True], [True, False], "v2"),  # better: promoted
    ],
    ids=["worse-rolled-back", "better-promoted"],
)
async def test_live_feedback_decides_the_canary(
    make_server, model_dir: Path, lora_dirs, canary_thumbs, stable_thumbs, expected_current
) -> None:
    from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

    server = await make_server(default_adapter=NAME, canary_check_s=0.2, canary_min_observations=10)
    reg = AdapterRegistry(server.config.adapter_dir)
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    reg.publish(NAME, lora_dirs["r8a"], manifest)
    reg.publish(NAME, lora_dirs["r8b"], manifest, channel=None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub, admin = pb_grpc.GenerationServiceStub(ch), apb_grpc.AdminServiceStub(ch)
        await _wait_version(stub, "v1")
        await admin.SetCanary(apb.SetCanaryRequest(name=NAME, version="v2", share=0.5, auto_decide=True))
        users = [f"user-{i}" for i in range(120)]
        await _judge_traffic(stub, fpb_grpc.FeedbackServiceStub(ch), users, {"v1": stable_thumbs, "v2": canary_thumbs})
        state = await _canary_outcome(admin)
        assert state.current_version == expected_current
        assert reg.channel(NAME) == expected_current
        listed = {v.version: v for v in state.versions}
        assert listed["v2"].feedback.thumbs_up + listed["v2"].feedback.thumbs_down > 0
        decision = "rolled_back" if expected_current == "v1" else "promoted"
        assert server.metrics.canary_decisions.labels(NAME, decision)._value.get() == 1


async def test_the_sidecar_publishes_a_canary_and_live_feedback_rolls_a_worse_one_back(
    make_server, model_dir: Path, lora_dirs
) -> None:
    from trainer_fixtures import QUESTIONS, ListSource, tiny_config, toy_rows

    from tuneloop.trainer.runner import run_round
    from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc

    server = await make_server(default_adapter=NAME, canary_check_s=0.2, canary_min_observations=10)
    reg = AdapterRegistry(server.config.adapter_dir)
    reg.publish(NAME, lora_dirs["r8a"], {"base_model": base_model_fingerprint(model_dir)})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub, admin = pb_grpc.GenerationServiceStub(ch), apb_grpc.AdminServiceStub(ch)
        await _wait_version(stub, "v1")
        # A real round on top of v1, published the default way (publish="canary").
        cfg = tiny_config(str(reg.root), str(model_dir), adapter=NAME, publish="canary", canary_share=0.5)
        reg.set_channel(NAME, "current", "v1")
        result = await asyncio.to_thread(run_round, cfg, ListSource(*toy_rows(QUESTIONS)), reg)
        assert result.outcome == "published" and result.version == "v2" and result.routed == "canary at 50%"
        assert reg.channel(NAME) == "v1"

        async def canary_on() -> apb.AdapterState | None:
            state = (await admin.ListAdapters(apb.ListAdaptersRequest(name=NAME))).adapters[0]
            return state if state.canary_version == "v2" else None

        state = await _eventually(canary_on, "the registry's canary picked up")
        assert state.current_version == "v1" and state.canary_share == pytest.approx(0.5)

        users = [f"user-{i}" for i in range(120)]
        await _judge_traffic(stub, fpb_grpc.FeedbackServiceStub(ch), users, {"v1": [True], "v2": [False]})
        state = await _canary_outcome(admin)
        assert state.current_version == "v1" and reg.channel(NAME) == "v1"
        assert reg.canary(NAME) is None  # ended in the registry too: other replicas and the sidecar see it
        assert reg.canary_log(NAME)[-1]["event"] == "rolled_back"
        assert server.metrics.canary_decisions.labels(NAME, "rolled_back")._value.get() == 1
        assert {await _version_of_next(stub, u) for u in users[:20]} == {"v1"}
