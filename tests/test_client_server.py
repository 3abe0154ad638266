"""The SDK and the CLI against a real server on the real engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.client import AsyncClient, Client, InvalidArgumentError, NotFoundError

pytestmark = pytest.mark.engine


async def test_sync_and_async_sdk(server) -> None:
    target = f"127.0.0.1:{server.port}"

    def sync_calls() -> tuple[str, str, str]:
        with Client(target, timeout=60) as c:
            r = c.generate(messages=[("user", "What is the capital of France?")], max_tokens=16, temperature=0)
            streamed = "".join(
                ch.text_delta for ch in c.generate_stream("Once upon a time", max_tokens=8, temperature=0)
            )
            with pytest.raises(InvalidArgumentError, match="top_p"):
                c.generate("hi", top_p=2.0)
            with pytest.raises(NotFoundError):
                c.generate("hi", adapter="nosuch")
            return r.text, r.completions[0].adapter, streamed

    text, adapter, streamed = await asyncio.to_thread(sync_calls)
    assert "Paris" in text and adapter == "base" and streamed

    async with AsyncClient(target) as ac:
        pair = await ac.generate("Say something kind.", n=2, max_tokens=8, temperature=1.0, seed=7)
        assert pair.group_id and len(pair.completions) == 2
        chunks = [ch async for ch in ac.generate_stream("Once upon a time", max_tokens=8, temperature=0)]
        assert "".join(ch.text_delta for ch in chunks) == streamed
        assert chunks[-1].completion is not None


async def test_cli_generate_json_and_errors(server, tmp_path: Path) -> None:
    env = {**os.environ, "TUNELOOP_TARGET": f"127.0.0.1:{server.port}"}
    cli = [sys.executable, "-m", "tuneloop.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)

    ok = await asyncio.to_thread(
        run,
        "generate",
        "What is the capital of France?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert "Paris" in result["completions"][0]["text"]

    streamed = await asyncio.to_thread(run, "generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8")
    assert streamed.returncode == 0 and streamed.stdout.strip()

    bad = await asyncio.to_thread(run, "generate", "hi", "--top-p", "3")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr

    status = await asyncio.to_thread(run, "adapters", "status")  # a fresh registry: says so, not silence
    assert status.returncode == 0 and "no adapters" in status.stdout, status
