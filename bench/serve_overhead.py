"""What the gRPC layer costs, measured against vLLM itself in one run.

Workload: 16 concurrent streaming chat requests of 64 new tokens (sampled, no seed: vLLM's own
seeded sampling, which the baseline and vLLM's server would use, crashes its CPU engine once a
prompt is prefilled in chunks), repeated.
  1. in-process: the same requests straight into the engine's AsyncLLM (the baseline);
  2. gRPC: through tuneloop's GenerateStream, from a separate client process, completion log on;
  3. gRPC with the completion log off;
  3b. gRPC with --durable-completions (each answer waits for its record's commit);
  4. vLLM's own OpenAI-compatible HTTP server on the same model, streaming chat completions.
The modes alternate over several rounds; vLLM's server runs beside our engine (idle while the
others run), so every mode sees the same machine.

    .venv/bin/python bench/serve_overhead.py [--rounds 3] [--skip-http]

Printed beside it: `vs_vllm_http_ratio` (our gRPC tokens/s over vLLM's HTTP server's) and
`ttft_p50_vs_vllm_http` (p50 time to first token of the 16-request burst, ours over theirs).
Last line: `serve_overhead_ratio: X` (gRPC tokens/s over in-process tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

CONCURRENCY = 16
NEW_TOKENS = 64
TOPICS = [
    "my commute",
    "the weather",
    "cooking dinner",
    "learning a language",
    "my garden",
    "a rainy Sunday",
    "board games",
    "the ocean",
    "old photographs",
    "a city at night",
    "coffee",
    "running",
    "trains",
    "the mountains",
    "a library",
    "winter",
]


def prompts() -> list[str]:
    return [f"Write a short paragraph about {t}." for t in TOPICS[:CONCURRENCY]]


# --------------------------------------------------------------------------- gRPC client process
def _grpc_client(port: int, rounds: int, out: mp.Queue) -> None:
    import grpc

    from tuneloop.v1 import generation_pb2 as pb
    from tuneloop.v1 import generation_pb2_grpc as pb_grpc

    async def one(stub: pb_grpc.GenerationServiceStub, i: int, text: str) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        req = pb.GenerateRequest(
            chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=text)]),
            sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0),
        )
        async for msg in stub.GenerateStream(req):
            if ttft is None and msg.text_delta:
                ttft = time.perf_counter() - t0
            if msg.HasField("completion"):
                tokens = msg.completion.usage.completion_tokens
        return tokens, ttft or 0.0, time.perf_counter() - t0

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for _ in range(rounds):
                out.get()  # wait for the go signal: the parent alternates modes
                t0 = time.perf_counter()
                res = await asyncio.gather(*(one(stub, i, p) for i, p in enumerate(prompts())))
                wall = time.perf_counter() - t0
                out.put({"tokens": sum(r[0] for r in res), "wall": wall, "ttfts": [r[1] for r in res],
                         "totals": [r[2] for r in res]})  # fmt: skip

    asyncio.run(main())


# --------------------------------------------------------------------------- in-process baseline
async def _inprocess(engine: object) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    llm = engine._llm  # the AsyncLLM under tuneloop's engine wrapper

    async def one(i: int, text: str) -> tuple[int, float]:
        ids = engine.tokenize(engine.render_chat([{"role": "user", "content": text}]))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, output_kind=RequestOutputKind.DELTA)
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        async for out in llm.generate({"prompt_token_ids": ids}, params, f"bench-{i}-{time.time_ns()}"):
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            tokens += len(out.outputs[0].token_ids)
        return tokens, ttft or 0.0

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts())))
    return {"tokens": sum(r[0] for r in res), "wall": time.perf_counter() - t0, "ttfts": [r[1] for r in res]}


# --------------------------------------------------------------------------- vLLM HTTP server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_round(port: int, model: str) -> dict:
    # A burst as the gRPC client sends it: all 16 requests leave together (one thread each: the
    # default pool of min(32, cores + 4) threads would let only 6 start at once on 2 cores and
    # stagger the rest, flattering the HTTP server's time to first token).
    start = threading.Barrier(CONCURRENCY)

    def one(i: int, text: str) -> tuple[int, float]:
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": NEW_TOKENS,
                "temperature": 1.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        start.wait()
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        return tokens, ttft or 0.0

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(loop.run_in_executor(pool, one, i, p) for i, p in enumerate(prompts())))
    return {"tokens": sum(r[0] for r in res), "wall": time.perf_counter() - t0, "ttfts": [r[1] for r in res]}


@contextlib.asynccontextmanager
async def _http_server(model_dir: str, enable_lora: bool) -> AsyncIterator[int]:
    """vLLM's own OpenAI-compatible server on the same model, in the dtype tuneloop's `auto` serves
    in on this host (same arithmetic); yields its port once it answers."""
    from tuneloop.server.hardware import fastest_dtype

    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="vllm-http-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
         "--host", "127.0.0.1", "--max-model-len", "2048", "--served-model-name", "m",
         "--dtype", fastest_dtype("auto", "cpu"), *(["--enable-lora"] if enable_lora else [])],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM HTTP server exited; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("vLLM HTTP server did not start in 300 s") from None
                await asyncio.sleep(1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- driver
def _tps(runs: list[dict]) -> float:
    return statistics.median(r["tokens"] / r["wall"] for r in runs)


def _ttft_p50(runs: list[dict]) -> float:
    return statistics.median(t for r in runs for t in r["ttfts"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-http", action="store_true", help="skip vLLM's HTTP server comparison")
    ap.add_argument(
        "--http-enable-lora",
        action="store_true",
        help="start vLLM's server with LoRA support, as tuneloop's engine runs (vLLM's CPU platform turns "
        "torch.compile off whenever LoRA is enabled)",
    )
    args = ap.parse_args()

    from tuneloop.server.model_cache import ensure_default_model

    model_dir = str(ensure_default_model())
    async with contextlib.AsyncExitStack() as stack:
        # vLLM's server idles beside our engine and takes its turn in every round, so both see
        # the same machine (an idle engine waits on its socket and costs no CPU).
        http_port = (
            None if args.skip_http else await stack.enter_async_context(_http_server(model_dir, args.http_enable_lora))
        )
        await _run(args.rounds, model_dir, http_port)


async def _run(rounds: int, model_dir: str, http_port: int | None) -> None:
    from tuneloop.server.app import TuneloopServer
    from tuneloop.server.config import ServerConfig
    from tuneloop.server.engine import start_engine

    home = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    cfg = dict(port=0, metrics_port=-1, adapter_dir=str(home / "adapters"), max_model_len=2048)
    engine = await start_engine(ServerConfig(**cfg, store_url=f"sqlite:///{home}/a.db"), model_dir)
    servers = {
        "grpc": TuneloopServer(ServerConfig(**cfg, store_url=f"sqlite:///{home}/a.db"), engine=engine),
        "grpc_nolog": TuneloopServer(
            ServerConfig(**cfg, store_url=f"sqlite:///{home}/b.db", completion_log=False), engine=engine
        ),
        "grpc_durable": TuneloopServer(
            ServerConfig(**cfg, store_url=f"sqlite:///{home}/c.db", durable_completions=True), engine=engine
        ),
    }
    ctx = mp.get_context("spawn")
    clients = {}
    for name, srv in servers.items():
        port = await srv.start()
        await srv.wait_ready(60)
        q_in, q_out = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=_grpc_client, args=(port, rounds + 1, _Duplex(q_in, q_out)), daemon=True)
        p.start()
        clients[name] = (p, q_in, q_out)

    async def grpc_round(name: str) -> dict:
        _, q_in, q_out = clients[name]
        q_in.put("go")
        return await asyncio.to_thread(q_out.get)

    results: dict[str, list[dict]] = {"inprocess": [], "grpc": [], "grpc_nolog": [], "grpc_durable": []}
    if http_port is not None:
        results["vllm_http"] = []
    # Warm-up every path once (first requests compile and fill caches).
    await _inprocess(engine)
    for name in clients:
        await grpc_round(name)
    if http_port is not None:
        await _http_round(http_port, "m")
    for r in range(rounds):
        results["inprocess"].append(await _inprocess(engine))
        results["grpc"].append(await grpc_round("grpc"))
        results["grpc_nolog"].append(await grpc_round("grpc_nolog"))
        results["grpc_durable"].append(await grpc_round("grpc_durable"))
        if http_port is not None:
            results["vllm_http"].append(await _http_round(http_port, "m"))
        print(
            f"round {r + 1}: "
            + ", ".join(f"{k} {v[-1]['tokens'] / v[-1]['wall']:.1f} tok/s" for k, v in results.items()),
            flush=True,
        )
    for p, _, _ in clients.values():
        p.join(30)
    for srv in servers.values():
        await srv.stop(grace=5)
    engine.shutdown()

    tps = {k: _tps(v) for k, v in results.items()}
    ttft = {k: _ttft_p50(v) for k, v in results.items()}
    for k in results:
        print(f"{k}: {tps[k]:.1f} tok/s, ttft p50 {ttft[k] * 1000:.0f} ms")
    print(f"completion_log_on_vs_off_ratio: {tps['grpc'] / tps['grpc_nolog']:.3f}")
    print(f"grpc_added_ttft_p50_ms: {(ttft['grpc'] - ttft['inprocess']) * 1000:.1f}")
    total = {k: statistics.median(t for r in results[k] for t in r["totals"]) for k in ("grpc", "grpc_durable")}
    print(f"durable_completions_added_latency_p50_ms: {(total['grpc_durable'] - total['grpc']) * 1000:.1f}")
    print(f"durable_vs_default_ratio: {tps['grpc_durable'] / tps['grpc']:.3f}")
    if http_port is not None:
        print(f"vs_vllm_http_ratio: {tps['grpc'] / tps['vllm_http']:.3f}")
        # The burst: 16 requests arrive together; p50 time to first token, ours over theirs.
        print(f"ttft_p50_vs_vllm_http: {ttft['grpc'] / ttft['vllm_http']:.3f}")
    print(f"serve_overhead_ratio: {tps['grpc'] / tps['inprocess']:.3f}")


class _Duplex:
    """Two queues handed to the client process as one: it reads go-signals and writes results."""

    def __init__(self, q_in: mp.Queue, q_out: mp.Queue) -> None:
        self.q_in, self.q_out = q_in, q_out

    def get(self) -> object:
        return self.q_in.get()

    def put(self, item: object) -> None:
        self.q_out.put(item)


if __name__ == "__main__":
    asyncio.run(main())
