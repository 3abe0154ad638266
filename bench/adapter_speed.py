"""What serving an adapter costs, on vLLM's LoRA path and on tuneloop's fast path, in one run.

Workload: 16 concurrent chat requests of 64 new tokens (sampled), on one engine:
  1. base: the bare model;
  2. lora: a rank-8 LoRA on q/k/v/o through vLLM's LoRA path (nothing folded);
  3. fast: the same adapter folded into the weights (server/fast_path.py), served with no LoRA.
Rounds alternate base, lora, fast so machine noise hits all three; switching onto the fast path
(and off it, back to the bare weights) is timed each round.

    .venv/bin/python bench/adapter_speed.py [--rounds 3]

Last line: `adapter_vs_base_throughput: X` (fast path tokens/s over base tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

CONCURRENCY = 16
NEW_TOKENS = 64
TOPICS = (
    "my commute", "the weather", "cooking dinner", "learning a language", "my garden", "a rainy Sunday",
    "board games", "the ocean", "old photographs", "a city at night", "coffee", "running", "trains",
    "the mountains", "a library", "winter",
)  # fmt: skip


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-8 LoRA on q/k/v/o with small random weights, as a trained adapter has."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    peft_model.save_pretrained(out)
    return out


async def burst(engine: object, adapter: object) -> float:
    """Tokens per second of one burst of CONCURRENCY requests."""
    from tuneloop.server.domain import SamplingSpec, new_id
    from tuneloop.server.engine import EngineRequest

    async def one(topic: str) -> int:
        text = engine.render_chat([{"role": "user", "content": f"Write a short paragraph about {topic}."}])
        req = EngineRequest(
            new_id("bench"), engine.tokenize(text), SamplingSpec(max_tokens=NEW_TOKENS, temperature=1.0), adapter
        )
        return sum([len(d.token_ids) async for d in engine.generate(req)])

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(t) for t in TOPICS[:CONCURRENCY]))
    return sum(tokens) / (time.perf_counter() - t0)


async def fold(engine: object, adapter: object) -> float:
    t0 = time.perf_counter()
    engine.serve_folded(adapter)
    await engine.settled()
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tuneloop.server.config import ServerConfig
    from tuneloop.server.engine import LoadedAdapter, next_adapter_id, start_engine
    from tuneloop.server.hardware import fastest_dtype
    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    path = await asyncio.to_thread(make_adapter, model_dir, home / "adapter")
    cfg = ServerConfig(port=0, metrics_port=-1, adapter_dir=str(home / "reg"), store_url=f"sqlite:///{home}/a.db")
    engine = await start_engine(cfg, str(model_dir))
    print(f"engine dtype {fastest_dtype(cfg.dtype)}; {CONCURRENCY} streams x {NEW_TOKENS} tokens", flush=True)
    adapter = LoadedAdapter("bench@v1", next_adapter_id(), str(path))
    await engine.add_adapter(adapter)
    try:
        for mode in ("base", "lora", "fast"):  # warm-up: first requests fill caches
            await (fold(engine, adapter) if mode == "fast" else fold(engine, None))
            await burst(engine, None if mode == "base" else adapter)
        await fold(engine, None)
        tps: dict[str, list[float]] = {"base": [], "lora": [], "fast": []}
        onto: list[float] = []
        off: list[float] = []
        for r in range(args.rounds):
            tps["base"].append(await burst(engine, None))
            tps["lora"].append(await burst(engine, adapter))
            onto.append(await fold(engine, adapter))
            tps["fast"].append(await burst(engine, adapter))
            off.append(await fold(engine, None))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in tps.items()), flush=True)
    finally:
        engine.shutdown()
    med = {k: statistics.median(v) for k, v in tps.items()}
    for k, v in med.items():
        print(f"{k}: {v:.1f} tok/s")
    print(f"swap_onto_fast_path_s: {statistics.median(onto):.2f}")
    print(f"swap_off_fast_path_s: {statistics.median(off):.2f}")
    print(f"lora_vs_base_throughput: {med['lora'] / med['base']:.3f}")
    print(f"adapter_vs_base_throughput: {med['fast'] / med['base']:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
