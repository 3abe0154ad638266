"""Hot swap under load: 5 publishes while 16 concurrent streams run.

The server runs in this process on its own engine, serving adapter `default`; a client process
keeps 16 streams busy (16 to 48 new tokens each, 32 on average, back to back) and records, per
request, when its first chunk arrived and which version served it. The lengths vary so that the
streams' requests end and start at independent times, as a service's users' do; with one fixed
length the 16 streams run in lockstep and a new request arrives only in bursts every few seconds,
which would time the arrival pattern rather than the swap. After a steady window on v1, a new version is
published every `--interval` seconds, 5 times.

    .venv/bin/python bench/hot_swap.py [--steady 20] [--interval 5]

Prints p50 and max seconds from publish to the first response served by the new version (the
first chunk of a request that the new version served, seen by the client), failed requests, and
tokens/s during the swaps over tokens/s before them (both windows serve a LoRA version).
Last line: `hot_swap_p50_s: X`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

STREAMS = 16
MIN_TOKENS, MAX_TOKENS = 16, 48
SWAPS = 5


def _client(port: int, stop_at: float, out: mp.Queue) -> None:
    import grpc

    from tuneloop.v1 import generation_pb2 as pb
    from tuneloop.v1 import generation_pb2_grpc as pb_grpc

    records: list[tuple[float, float, float, str, int, str]] = []

    async def worker(stub: pb_grpc.GenerationServiceStub, w: int) -> None:
        rng = random.Random(w)
        i = 0
        while time.time() < stop_at:
            i += 1
            req = pb.GenerateRequest(
                prompt=f"Write a note about day {i} of the trip ({w}).",
                sampling=pb.SamplingParams(
                    max_tokens=rng.randint(MIN_TOKENS, MAX_TOKENS), temperature=1.0, seed=w * 100000 + i
                ),
                caller=pb.CallerMetadata(user_id=f"user-{w}"),
            )
            t0 = time.time()
            first = 0.0
            try:
                async for msg in stub.GenerateStream(req, timeout=120):
                    if not first:
                        first = time.time()
                    if msg.HasField("completion"):
                        c = msg.completion
                        records.append((t0, first, time.time(), c.adapter.version, c.usage.completion_tokens, ""))
            except grpc.aio.AioRpcError as exc:
                records.append((t0, first, time.time(), "", 0, exc.code().name))

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            await asyncio.gather(*(worker(stub, w) for w in range(STREAMS)))

    asyncio.run(main())
    out.put(records)


def make_loras(model_dir: Path, root: Path, seeds: tuple[int, ...] = (1, 2)) -> list[Path]:
    """Random (non-zero) rank-8 LoRAs on q/k/v/o, one per seed: each visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        out = root / f"lora{seed}"
        get_peft_model(model, cfg).save_pretrained(out)
        dirs.append(out)
    return dirs


def _tps(records: list, start: float, end: float) -> float:
    tokens = sum(r[4] for r in records if start <= r[2] < end)
    return tokens / (end - start)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steady", type=float, default=20.0, help="seconds of load on v1 before the swaps")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between publishes")
    args = ap.parse_args()
    # The swap's own steps (loaded, probed, switched) with times, to read against "published".
    logging.basicConfig(format="%(asctime)s.%(msecs)03d %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tuneloop.server.adapters").setLevel(logging.INFO)

    from tuneloop.server.app import TuneloopServer
    from tuneloop.server.config import ServerConfig
    from tuneloop.server.model_cache import ensure_default_model
    from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-hotswap-"))
    loras = make_loras(model_dir, home)
    cfg = ServerConfig(
        port=0,
        metrics_port=-1,
        store_url=f"sqlite:///{home}/t.db",
        adapter_dir=str(home / "adapters"),
        model=str(model_dir),
        default_adapter="default",
    )
    reg = AdapterRegistry(cfg.adapter_dir)
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    reg.publish("default", loras[0], manifest)  # v1 serves from the start
    server = TuneloopServer(cfg)
    port = await server.start()
    await server.wait_ready(300)

    warmup = 10.0
    t_load = time.time()
    stop_at = t_load + warmup + args.steady + SWAPS * args.interval + args.interval
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client, args=(port, stop_at, out), daemon=True)
    proc.start()
    await asyncio.sleep(warmup + args.steady)
    steady = (t_load + warmup, time.time())
    published: list[tuple[str, float]] = []
    for i in range(SWAPS):
        t = time.time()
        v = reg.publish("default", loras[(i + 1) % 2], manifest).version
        published.append((v, t))
        print(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d} published {v}", flush=True)
        await asyncio.sleep(args.interval)
    swaps_window = (published[0][1], time.time())
    records = await asyncio.to_thread(out.get)
    proc.join(30)
    await server.stop(grace=5)

    latencies = []
    for v, t in published:
        firsts = [r[1] for r in records if r[3] == v and r[1]]
        if firsts:
            latencies.append(min(firsts) - t)
        else:
            print(f"{v}: never served")
    failed = [r for r in records if r[5]]
    before = _tps(records, *steady)
    during = _tps(records, *swaps_window)
    print(
        f"requests: {len(records)}, failed: {len(failed)}" + (f" ({sorted({r[5] for r in failed})})" if failed else "")
    )
    print("publish_to_first_served_s: " + ", ".join(f"{x:.2f}" for x in latencies))
    print(f"hot_swap_max_s: {max(latencies):.3f}")
    print(f"throughput before: {before:.1f} tok/s, during swaps: {during:.1f} tok/s")
    print(f"throughput_during_swaps_ratio: {during / before:.3f}")
    print(f"failed_requests: {len(failed)}")
    print(f"hot_swap_p50_s: {statistics.median(latencies):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
