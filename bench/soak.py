"""Soak: 64 concurrent streams for 10 minutes, feedback on every reply, three adapter swaps.

`tuneloop serve` runs as its own process, as a user runs it; this process keeps `--streams`
GenerateStream calls busy back to back (16 to 48 new tokens each, sampled) and sends a thumb on
every finished completion, while three LoRA versions are published to the registry at 1/4, 2/4 and
3/4 of the run (the server hot-swaps each in). It samples the server's resident memory (the server
process and its children, the engine core among them) every 10 s.

    .venv/bin/python bench/soak.py [--minutes 10] [--streams 64] [--out bench/out/soak]

Prints per minute: requests, errors, p99 time to first token, RSS; then the RSS growth from the
end of minute 2 to the end (goal < 5%) and the errors (goal 0). Last line `soak_errors: N`.
`--out` also writes every request (start, time to first token, end, version) to requests.csv
and a timeline (timeline.png: time to first token of each request, the publishes and the
server's weight folds, and the RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc
from hot_swap import make_loras
from procs import start, stop, wait_port, wait_serving

from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint
from tuneloop.v1 import feedback_pb2 as fpb
from tuneloop.v1 import feedback_pb2_grpc as fpb_grpc
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

MIN_TOKENS, MAX_TOKENS = 16, 48
TOPICS = ["the sea", "a garden", "trains", "winter", "coffee", "a library", "running", "old maps"]


RSS_KINDS = ("RssAnon", "RssFile", "RssShmem")


def tree_rss(pid: int) -> dict[tuple[str, str], int]:
    """Resident memory of `pid` and all its descendants, from /proc, in bytes by (process name,
    kind): anonymous memory (the heaps) apart from mapped files (the model's checkpoint, libraries)
    and shared memory (vLLM's message queues), so a growth can be put down to its cause."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    out: dict[tuple[str, str], int] = defaultdict(int)
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        name = "server" if p == pid else fields.get("Name", "?").strip()
        for kind in RSS_KINDS:
            if kind in fields:
                out[(name, kind)] += int(fields[kind].split()[0]) * 1024
    return dict(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--out", type=Path, help="directory for requests.csv and timeline.png")
    args = ap.parse_args()

    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-soak-"))
    loras = make_loras(model_dir, home, seeds=(1, 2, 3))
    env = {**os.environ, "TUNELOOP_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "2"}
    log = home / "server.log"
    server = start([sys.executable, "-m", "tuneloop.cli", "serve", "--port", "0", "--metrics-port", "-1",
                    "--model", str(model_dir), "--default-adapter", "default", "--max-num-seqs", str(args.streams)],
                   log, env)  # fmt: skip
    try:
        port = wait_port(log, server)
        wait_serving(grpc.insecure_channel(f"127.0.0.1:{port}"))
        print(f"server ready (log {log})", flush=True)
        await _soak(args, port, server.pid, home, model_dir, loras, log)
    finally:
        stop(server)


async def _soak(
    args: argparse.Namespace, port: int, pid: int, home: Path, model_dir: Path, loras: list[Path], log: Path
) -> None:
    reg = AdapterRegistry(home / "adapters")
    manifest = {"base_model": base_model_fingerprint(model_dir)}
    duration = args.minutes * 60
    t0 = time.monotonic()
    end = t0 + duration
    ttfts: dict[int, list[float]] = defaultdict(list)
    requests: dict[int, int] = defaultdict(int)
    errors: dict[int, list[str]] = defaultdict(list)
    parts: list[tuple[float, dict[tuple[str, str], int]]] = []  # (time, tree_rss) every 10 s
    versions: dict[str, int] = defaultdict(int)
    trace: list[tuple[float, float, float, str]] = []  # (start, time to first token, end, version) per request
    published: list[float] = []

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        gen, fb = pb_grpc.GenerationServiceStub(ch), fpb_grpc.FeedbackServiceStub(ch)

        async def worker(w: int) -> None:
            rng = random.Random(w)
            while time.monotonic() < end:
                minute = int((time.monotonic() - t0) // 60)
                ask = pb.ChatMessage(role="user", content=f"Tell me about {rng.choice(TOPICS)}.")
                req = pb.GenerateRequest(
                    chat=pb.ChatInput(messages=[ask]),
                    sampling=pb.SamplingParams(max_tokens=rng.randint(MIN_TOKENS, MAX_TOKENS), temperature=1.0),
                    caller=pb.CallerMetadata(user_id=f"user-{w}"),
                )  # fmt: skip
                started, first, done = time.monotonic(), None, None
                try:
                    async for msg in gen.GenerateStream(req):
                        if first is None and msg.text_delta:
                            first = time.monotonic() - started
                        if msg.HasField("completion"):
                            done = msg.completion
                    assert done is not None, "the stream ended without its completion"
                    versions[done.adapter.version or "base"] += 1
                    thumb = fpb.THUMB_UP if rng.random() < 0.6 else fpb.THUMB_DOWN
                    await fb.SubmitFeedback(fpb.FeedbackEvent(
                        rater_id=f"user-{w}", thumbs=fpb.ThumbsFeedback(completion_id=done.completion_id, value=thumb)
                    ))  # fmt: skip
                except (grpc.aio.AioRpcError, AssertionError) as exc:
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "NO_COMPLETION"
                    errors[minute].append(code)
                    continue
                requests[minute] += 1
                ttfts[minute].append(first or 0.0)
                trace.append((started - t0, first or 0.0, time.monotonic() - t0, done.adapter.version or "base"))

        async def swaps() -> None:
            for i, lora in enumerate(loras):
                await asyncio.sleep(max(0.0, t0 + duration * (i + 1) / 4 - time.monotonic()))
                v = await asyncio.to_thread(reg.publish, "default", lora, manifest)
                published.append(time.monotonic() - t0)
                print(f"{time.monotonic() - t0:6.0f} s: published {v.version}", flush=True)

        async def memory() -> None:
            while time.monotonic() < end:
                parts.append((time.monotonic() - t0, await asyncio.to_thread(tree_rss, pid)))
                await asyncio.sleep(10)

        await asyncio.gather(*(worker(w) for w in range(args.streams)), swaps(), memory())
    rss = [(t, sum(sample.values())) for t, sample in parts]

    minutes = int(duration // 60) + (1 if duration % 60 else 0)
    print("minute  requests  errors  ttft_p99_ms  rss_mib")
    p99s = []
    for m in range(minutes):
        xs = sorted(ttfts[m])
        p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000 if xs else float("nan")
        p99s.append(p99)
        at = [b for t, b in rss if m * 60 <= t < (m + 1) * 60]
        print(f"{m + 1:6d}  {requests[m]:8d}  {len(errors[m]):6d}  {p99:11.0f}  {(at[-1] if at else 0) / 2**20:7.0f}")
    print("served by version:", dict(sorted(versions.items())))
    after2 = [sample for t, sample in parts if t >= min(120.0, duration / 2)]
    if len(after2) >= 2:
        first, last = after2[0], after2[-1]
        before, after = sum(first.values()), sum(last.values())
        print(f"rss_growth_from_minute_2: {(after - before) / before * 100:+.1f}%")
        print("rss by process and kind, MiB (from minute 2 -> end):")
        for key in sorted(set(first) | set(last)):
            a, b = first.get(key, 0) / 2**20, last.get(key, 0) / 2**20
            if max(a, b) >= 1:
                print(f"  {key[0]:<24} {key[1]:<9} {a:8.0f} -> {b:8.0f}  ({b - a:+.0f})")
    codes = [c for m in errors.values() for c in m]
    if codes:
        print("errors by code:", {c: codes.count(c) for c in sorted(set(codes))})
    if len(p99s) >= 3:  # flat: the last full minute against minute 2 (minute 1 includes warm-up)
        print(f"ttft_p99_last_over_minute_2_ratio: {p99s[-1] / p99s[1]:.2f}")
    if args.out is not None:
        write_timeline(args.out, trace, published, fold_times(log, time.time() - (time.monotonic() - t0)), rss)
    print(f"soak_errors: {len(codes)}")


def fold_times(log: Path, t0_wall: float) -> list[tuple[float, float]]:
    """(seconds into the soak, seconds new requests were held) of each weight fold in the server's log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "fast path:" in line and "new requests held" in line:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            held = float(line.split("new requests held ")[1].split(" s")[0])
            out.append((stamp - t0_wall, held))
    return out


def write_timeline(
    out: Path,
    trace: list[tuple[float, float, float, str]],
    published: list[float],
    folds: list[tuple[float, float]],
    rss: list[tuple[float, int]],
) -> None:
    import matplotlib  # noqa: PLC0415 - only for --out

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    with (out / "requests.csv").open("w") as f:
        f.write("start_s,ttft_s,end_s,version\n")
        f.writelines(f"{s:.3f},{t:.3f},{e:.3f},{v}\n" for s, t, e, v in trace)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, height_ratios=(3, 1))
    top.scatter([s for s, *_ in trace], [t for _, t, *_ in trace], s=3, alpha=0.5, label="a request's first token")
    for i, at in enumerate(published):
        top.axvline(at, color="tab:green", ls="--", lw=1, label="published" if i == 0 else None)
    for i, (at, held) in enumerate(folds):
        top.axvspan(at - held, at, color="tab:red", alpha=0.3, label="fold held new requests" if i == 0 else None)
    top.set_ylabel("time to first token (s)")
    top.legend(loc="upper left")
    top.set_title(f"soak: {len(trace)} requests")
    bottom.plot([t for t, _ in rss], [b / 2**20 for _, b in rss])
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds into the soak")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    print(f"wrote {out / 'requests.csv'} and {out / 'timeline.png'}")


if __name__ == "__main__":
    asyncio.run(main())
