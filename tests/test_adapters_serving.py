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


def make_lora(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A peft LoRA on q/k/v/o with random (non-zero) B, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "r8a": make_lora(model_dir, root / "r8a", 8, 1),
        "r8b": make_lora(model_dir, root / "r8b", 8, 2),
        "r32": make_lora(model_dir, root / "r32", 32, 3),
    }


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
        current = (await stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support")))).completions[0]
        pinned = (await stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support", version="v1")))).completions[0]
        assert (base.adapter.name, base.adapter.version) == ("base", "base")
        assert (current.adapter.name, current.adapter.version) == ("support", "v2")
        assert (pinned.adapter.name, pinned.adapter.version) == ("support", "v1")
        # Random LoRA weights change greedy text; the two versions differ from each other too.
        assert len({base.text, current.text, pinned.text}) == 3

        # Concurrent first requests for a version load it once and all succeed.
        many = await asyncio.gather(*[
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=GREEDY, adapter=pb.AdapterSelector(name="support", version="v1")))
            for _ in range(4)
        ])
        assert {r.completions[0].text for r in many} == {pinned.text}

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter=pb.AdapterSelector(name="support", version="v9")))
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
