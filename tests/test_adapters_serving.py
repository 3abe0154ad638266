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


FOLD_PROMPTS = ("The best way to spend a weekend is", "Write a haiku about the sea.", "My favourite food is")
# In bf16 the folded weights W + s·BA are rounded to 8 mantissa bits once more than the LoRA
# path's, so a greedy choice between two near-tied tokens may flip: there the chosen tokens'
# log-probabilities must be within this of each other, as must every shared token's. In float32
# the texts must be equal.
BF16_LOGPROB_TOLERANCE = 0.25


def _same_or_near_tie(a: list[tuple[int, float]], b: list[tuple[int, float]], exact: bool) -> str:
    """'' when greedy sequences a and b (token id, log-prob) agree; else what differs."""
    if exact:
        return "" if [t for t, _ in a] == [t for t, _ in b] else f"tokens differ: {a} vs {b}"
    for i, ((ta, la), (tb, lb)) in enumerate(zip(a, b, strict=False)):
        if abs(la - lb) > BF16_LOGPROB_TOLERANCE:
            return f"token {i}: {ta} ({la:.3f}) vs {tb} ({lb:.3f})"
        if ta != tb:
            return ""  # a near-tie flipped; what follows continues different texts
    return "" if len(a) == len(b) else f"lengths {len(a)} vs {len(b)}"


async def test_the_folded_version_and_every_other_path_write_what_the_lora_path_writes(
    make_server, lora_dirs, model_dir: Path
) -> None:
    """With v1 carrying default traffic, the engine serves it folded into the base weights; v1,
    the pinned v2 and the bare base must still write what the LoRA path writes."""
    from tuneloop.server.hardware import fastest_dtype

    server = await make_server(default_adapter="support")
    reg = AdapterRegistry(server.config.adapter_dir)
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    reg.publish("support", lora_dirs["r8a"], manifest, channel=None)
    reg.publish("support", lora_dirs["r8b"], manifest, channel=None)
    selectors = {
        "v1": pb.AdapterSelector(name="support", version="v1"),
        "v2": pb.AdapterSelector(name="support", version="v2"),
        "base": pb.AdapterSelector(name="base"),
    }
    sampling = pb.SamplingParams(max_tokens=16, temperature=0.0, logprobs=True)

    async def generate(stub: pb_grpc.GenerationServiceStub) -> dict[tuple[str, str], list[tuple[int, float]]]:
        out = {}
        for label, selector in selectors.items():
            for prompt in FOLD_PROMPTS:
                got = await stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=sampling, adapter=selector))
                c = got.completions[0]
                assert c.adapter.version == (label if label != "base" else "base")
                out[label, prompt] = [(lp.token_id, lp.logprob) for lp in c.logprobs]
        return out

    engine = server.engine
    exact = fastest_dtype(server.config.dtype) == "float32"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        assert engine.folded == ""
        lora_path = await generate(stub)
        reg.set_channel("support", "current", "v1")
        async with asyncio.timeout(60):
            while engine.folded != "support@v1":
                await engine.settled()
                await asyncio.sleep(0.05)  # until the registry watcher has asked for the fold
        # The first requests on the difference LoRAs arrive together (as requests a fold held
        # are released): one LoRA per path, or vLLM's batch loses one and its engine dies.
        burst = await asyncio.gather(
            *(
                stub.Generate(pb.GenerateRequest(prompt=FOLD_PROMPTS[0], sampling=sampling, adapter=selectors[label]))
                for label in ("base", "v2") * 6
            )
        )
        folded = await generate(stub)
        default = await stub.Generate(pb.GenerateRequest(prompt=FOLD_PROMPTS[0], sampling=sampling))
    assert len({tuple(t for t, _ in seq) for seq in lora_path.values()}) > len(FOLD_PROMPTS)  # paths differ
    differences = {k: why for k in lora_path if (why := _same_or_near_tie(lora_path[k], folded[k], exact))}
    assert not differences, differences
    assert default.completions[0].adapter.version == "v1"
    for label, got in zip(("base", "v2") * 6, burst, strict=True):  # batched: same text, near logprobs
        seq = [(lp.token_id, lp.logprob) for lp in got.completions[0].logprobs]
        assert not (why := _same_or_near_tie(seq, folded[label, FOLD_PROMPTS[0]], exact=False)), why
    assert [(lp.token_id, lp.logprob) for lp in default.completions[0].logprobs] == folded["v1", FOLD_PROMPTS[0]]
    metrics = server.metrics
    assert metrics.folded.labels("support", "v1")._value.get() == 1
    assert metrics.folds.labels("folded")._value.get() >= 1

    # A fold reloads only the blocks that change (the last fold's among them): v2 replaces v1.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        reg.set_channel("support", "current", "v2")
        async with asyncio.timeout(60):
            while engine.folded != "support@v2":
                await engine.settled()
                await asyncio.sleep(0.05)
        v2_folded = await generate(stub)
    differences = {k: why for k in lora_path if (why := _same_or_near_tie(lora_path[k], v2_folded[k], exact))}
    assert not differences, differences
    engine.serve_folded(None)
    await engine.settled()


async def test_requests_running_across_a_fold_continue_with_what_their_version_writes(
    make_server, lora_dirs, model_dir: Path
) -> None:
    """A fold preempts the running requests and continues each on the new weights: the streams
    pause, and the rest of each text is what the version writes without a fold."""
    from tuneloop.server.hardware import fastest_dtype

    server = await make_server(default_adapter="support", fold_settle_s=0.0)
    reg = AdapterRegistry(server.config.adapter_dir)
    reg.publish("support", lora_dirs["r8a"], {"base_model": base_model_fingerprint(model_dir)}, channel=None)
    v1 = pb.AdapterSelector(name="support", version="v1")
    sampling = pb.SamplingParams(max_tokens=96, temperature=0.0, logprobs=True)
    prompts = ("Tell me a long story about a lighthouse keeper.", *FOLD_PROMPTS)
    engine = server.engine
    first_tokens = asyncio.Semaphore(0)

    async def stream(stub: pb_grpc.GenerationServiceStub, prompt: str) -> tuple[str, str, list[tuple[int, float]]]:
        deltas: list[str] = []
        async for msg in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, sampling=sampling, adapter=v1)):
            if msg.HasField("completion"):
                c = msg.completion
                assert c.adapter.version == "v1"
                return "".join(deltas), c.text, [(lp.token_id, lp.logprob) for lp in c.logprobs]
            if not deltas:
                first_tokens.release()
            deltas.append(msg.text_delta)
        raise AssertionError("the stream ended without its completion")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        alone = await asyncio.gather(*(stream(stub, p) for p in prompts))  # the LoRA path, no fold
        tasks = [asyncio.create_task(stream(stub, p)) for p in prompts]
        for _ in prompts:
            await first_tokens.acquire()
        reg.set_channel("support", "current", "v1")  # the watcher asks for the fold at once
        async with asyncio.timeout(60):
            while engine.folded != "support@v1":
                await engine.settled()
                await asyncio.sleep(0.05)
        across = await asyncio.gather(*tasks)
    assert engine.preempted >= 1, "every request finished before the fold: nothing was preempted"
    assert server.metrics.fold_preempted._value.get() == engine.preempted
    exact = fastest_dtype(server.config.dtype) == "float32"
    for prompt, (_, text, ref), (streamed, got_text, got) in zip(prompts, alone, across, strict=True):
        assert streamed == got_text, prompt  # the stream's pieces make the stored text, cut or not
        assert not (why := _same_or_near_tie(ref, got, exact)), (prompt, why)
        if [t for t, _ in ref] == [t for t, _ in got]:
            assert got_text == text, prompt
    engine.serve_folded(None)
    await engine.settled()
