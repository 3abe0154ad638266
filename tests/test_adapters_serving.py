"""Requests naming an adapter are served with that LoRA version by the real engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine


GREEDY = pb.SamplingParams(max_tokens=12, temperature=0.0)
PROMPT = "The best way to spend a weekend is"


async def test_adapter_versions_are_served_and_named(make_server, lora_dirs, model_dir: Path) -> None:
    server = await make_server()
    reg = AdapterRegistry(server.config.adapter_dir)
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    reg.publish("support", lora_dirs["r8a"], manifest)
    reg.publish("support", lora_dirs["r8b"], manifest)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        base = (await stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY))).completions[0]
        current = (
            await stub.Generate(
                pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support"))
            )
        ).completions[0]
        pinned = (
            await stub.Generate(
                pb.GenerateRequest(
                    prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support", version="v1")
                )
            )
        ).completions[0]
        assert (base.adapter.name, base.adapter.version) == ("base", "base")
        assert (current.adapter.name, current.adapter.version) == ("support", "v2")
        assert (pinned.adapter.name, pinned.adapter.version) == ("support", "v1")
        # Random LoRA weights change greedy text; the two versions differ from each other too.
        assert len({base.text, current.text, pinned.text}) == 3, (base.text, current.text, pinned.text)

        # Concurrent first requests for a version not loaded yet load it once and all succeed. v3
        # has v1's weights, so it must also write v1's text.
        assert reg.publish("support", lora_dirs["r8a"], manifest, channel=None).version == "v3"
        loads: list[str] = []
        engine_add = server.engine.add_adapter

        async def counted_add(adapter) -> None:  # type: ignore[no-untyped-def] # the real load, counted
            loads.append(adapter.key)
            await engine_add(adapter)

        server.engine.add_adapter = counted_add
        try:
            many = await asyncio.gather(
                *[
                    stub.Generate(
                        pb.GenerateRequest(
                            prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support", version="v3")
                        )
                    )
                    for _ in range(4)
                ]
            )
        finally:
            del server.engine.add_adapter
        assert loads == ["support@v3"]
        assert {(r.completions[0].adapter.version, r.completions[0].text) for r in many} == {("v3", pinned.text)}

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(
                pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterSelector(name="support", version="v9"))
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "v9" in err.value.details()

        # A rank above the server's max_lora_rank is refused with a message naming both ranks.
        reg.publish("wide", lora_dirs["r32"], manifest)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterSelector(name="wide")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "32" in err.value.details() and "16" in err.value.details()
        # So is an adapter trained on another base model.
        reg.publish("alien", lora_dirs["r8a"], {"base_model": "some-other-model@0123456789abcdef"})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterSelector(name="alien")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "base model" in err.value.details()
        ok = await stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY))
        assert ok.completions[0].text == base.text

    assert await asyncio.to_thread(server.completion_log.flush, 10)
    rec = server.store.get_completion(current.completion_id)
    assert (rec.adapter_name, rec.adapter_version) == ("support", "v2")


async def test_a_reward_model_entry_is_never_served(make_server, lora_dirs, model_dir: Path) -> None:
    server = await make_server()
    reg = AdapterRegistry(server.config.adapter_dir)
    reg.publish("judge", lora_dirs["r8a"], {"base_model": base_model_fingerprint(model_dir), "kind": "reward"})
    assert reg.get("judge", "v1").kind == "reward"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        for selector in (pb.AdapterSelector(name="judge"), pb.AdapterSelector(name="judge", version="v1")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY, adapter=selector))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "judge@v1 is a reward model" in err.value.details() and "policy" in err.value.details()
