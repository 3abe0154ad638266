"""A server on the shared registry (registry_url = s3://...) serves what a trainer elsewhere
publishes there: it follows a publish by polling, and a replica started later resolves the
channel on start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tuneloop.server.registry import base_model_fingerprint, open_registry
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine


async def _served_version(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = await pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=1))
        )
    return r.completions[0].adapter.version


async def _wait_serving(port: int, version: str, timeout: float = 60.0) -> float:
    """Seconds until the server answers with `version`; checked every 50 ms, the timeout only
    bounds a failure."""
    start = deadline = time.monotonic()
    deadline += timeout
    while (served := await _served_version(port)) != version:
        assert time.monotonic() < deadline, f"still serving {served!r}, not {version}, after {timeout:.0f} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_replicas_on_a_shared_registry_follow_a_publish_made_elsewhere(
    make_server, s3_url: str, lora_dirs: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    replica = await make_server(default_adapter="default", registry_url=s3_url, adapter_dir=str(tmp_path / "cache-1"))
    assert replica.config.registry_poll_s == 0.25  # the object store's default
    assert await _served_version(replica.port) == "base"  # nothing published yet
    trainer = open_registry(s3_url, tmp_path / "trainer")
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    await asyncio.to_thread(trainer.publish, "default", lora_dirs["r8a"], manifest)
    await _wait_serving(replica.port, "v1")
    # A replica that was down while v2 was published serves it from its first request.
    await asyncio.to_thread(trainer.publish, "default", lora_dirs["r8b"], manifest)
    late = await make_server(default_adapter="default", registry_url=s3_url, adapter_dir=str(tmp_path / "cache-2"))
    assert await _served_version(late.port) == "v2"
    await _wait_serving(replica.port, "v2")
    fetched = next((tmp_path / "cache-1").rglob("versions/v2/adapter_model.safetensors"))
    assert fetched.read_bytes() == (lora_dirs["r8b"] / "adapter_model.safetensors").read_bytes()
