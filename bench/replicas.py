"""Two `tuneloop serve` replicas on one PostgreSQL store and one adapter registry (on an object
store: a moto S3 server on loopback; `--registry dir` shares a local directory instead), behind the
SDK's round_robin client. Measures, in one run:

  1. throughput: `--streams` concurrent GenerateStream calls (`--requests` each, `--max-tokens`
     new tokens, sampled) through each replica alone, then through both, after a warm-up round on
     each; both over the mean of one alone is the figure. Each replica's engine is bound to its own core (vLLM binds all
     to core 0 otherwise; `--no-pin` keeps that); on a 2-core host the two servers' own threads
     still share those cores, so it cannot double
  2. publish -> every replica serving the new version: `--publishes` LoRA versions published to the
     registry, `--publish-interval` seconds apart (each from a settled set, the last one's fold
     done); from the start of each publish (the upload included) until every replica answers
     with it (each replica asked directly, one probe after another); p50 over the publishes
     (goal <= 1.5 s). The S3 server runs in its own process.
  3. a replica SIGKILLed and restarted under load: `--streams` workers (half unary Generate, a
     quarter feedback, a quarter streams) through the balanced client; failed calls per kind
     (goal 0 for the retried calls: Generate and feedback; a stream the dead replica was sending
     ends with UNAVAILABLE, and is counted apart)
  4. feedback ingest on PostgreSQL against SQLite: bench/feedback_ingest.py's batches (4 clients,
     batches of 500) into its feedback-only server over each store

    .venv/bin/python bench/replicas.py [--streams 16] [--requests 4] [--max-tokens 64]
                                       [--publishes 5] [--publish-interval 5] [--events 20000]
                                       [--registry s3|dir]

Needs the Debian PostgreSQL server (deploy/install.sh installs it). The last line is
`replicas_all_switched_p50_s: X`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from feedback_ingest import SERVER_SCRIPT, bench_batches, make_events, seed_completions
from hot_swap import make_loras

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import PostgresServer  # noqa: E402 - the tests' throwaway PostgreSQL
from replica_set import Replica, ReplicaSet  # noqa: E402 - the tests' replica processes

from tuneloop.client import AsyncClient, Client, TuneloopError  # noqa: E402
from tuneloop.server.model_cache import ensure_default_model  # noqa: E402
from tuneloop.server.registry import Registry, base_model_fingerprint, open_registry  # noqa: E402

NAME = "default"
TOPICS = ["the sea", "a garden", "trains", "winter", "coffee", "a library", "running", "old maps"]


def start_s3() -> subprocess.Popen[bytes]:
    """A moto S3 server on loopback in its own process (as a real object store is: its work does
    not share this process's interpreter with the probes), with the AWS variables every process
    here inherits."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="tuneloop-bench",
        AWS_SECRET_ACCESS_KEY="tuneloop-bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs  # noqa: PLC0415

    deadline = time.monotonic() + 60
    while True:
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("tuneloop-bench")
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)


# ------------------------------------------------------------------------ 1. throughput
async def stream_tokens(target: str | list[str], streams: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """(new tokens per second, failed calls) for `streams` workers of `requests` streams each."""
    failed = 0

    async def worker(client: AsyncClient, w: int) -> int:
        nonlocal failed
        tokens = 0
        for i in range(requests):
            prompt = f"Write a few sentences about {TOPICS[(w + i) % len(TOPICS)]}."
            try:
                async for chunk in client.generate_stream(messages=[("user", prompt)], max_tokens=max_tokens):
                    if chunk.completion is not None:
                        tokens += chunk.completion.completion_tokens
            except TuneloopError:
                failed += 1
        return tokens

    async with AsyncClient(target, timeout=600) as client:
        await client.generate("Hi", max_tokens=1)  # connected (every replica) before the clock starts
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(worker(client, w) for w in range(streams)))
        return sum(tokens) / (time.perf_counter() - t0), failed


# ------------------------------------------------------------------------ 2. publish -> all serving
def serving_version(replica: Replica, version: str, deadline: float) -> float:
    """Asks `replica` until an answer names `version`; the moment it did (perf_counter)."""
    with Client(replica.address, timeout=60) as client:
        while time.perf_counter() < deadline:
            if client.generate("Hi", max_tokens=1).completions[0].adapter_version == version:
                return time.perf_counter()
    raise RuntimeError(f"replica {replica.index} did not serve {version}; see {replica.log}")


def publish_to_all_serving(
    cluster: ReplicaSet, registry: Registry, loras: list[Path], manifest: dict[str, object], n: int, interval: float
) -> list[float]:
    seconds = []
    with ThreadPoolExecutor(len(cluster.replicas)) as pool:
        for i in range(n):
            # Each publish starts from a settled set, as publishes do in use (minutes apart): the
            # last version's fold into the weights has had time to end.
            time.sleep(interval)
            t0 = time.perf_counter()
            version = registry.publish(NAME, loras[i % len(loras)], manifest).version
            published = time.perf_counter() - t0
            deadline = t0 + 120
            done = list(
                pool.map(serving_version, cluster.replicas, [version] * cluster.count, [deadline] * cluster.count)
            )
            seconds.append(max(done) - t0)
            print(f"  {version}: published in {published:.2f} s, every replica serving it after "
                  f"{seconds[-1]:.2f} s (each: {', '.join(f'{d - t0:.2f}' for d in done)})", flush=True)  # fmt: skip
    return seconds


# ------------------------------------------------------------------------ 3. kill and restart under load
async def drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def kill_under_load(cluster: ReplicaSet, streams: int, max_tokens: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    async with AsyncClient(cluster.addresses, timeout=600) as client:
        ids = [(await client.generate("Hi", max_tokens=2)).completions[0].completion_id for _ in range(4)]
        calls: dict[str, Callable[[int], Awaitable[object]]] = {
            "generate": lambda i: client.generate("Count to twenty:", max_tokens=max_tokens),
            "feedback": lambda i: client.thumbs_up(ids[i % len(ids)], rater_id=f"rater-{i}"),
            "stream": lambda i: drain(client.generate_stream("Count to twenty:", max_tokens=max_tokens)),
        }

        async def worker(kind: str, w: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    await calls[kind](w * 1_000_000 + i)
                    outcomes[f"{kind} ok"] += 1
                except TuneloopError as exc:
                    outcomes[f"{kind} failed ({exc.code})"] += 1
                i += 1

        kinds = ["generate"] * (streams // 2) + ["feedback"] * (streams // 4)
        kinds += ["stream"] * (streams - len(kinds))
        workers = [asyncio.create_task(worker(k, w)) for w, k in enumerate(kinds)]
        victim = cluster.replicas[0]
        await asyncio.sleep(10)  # a bench: load runs a fixed while before and after the kill
        t0 = time.perf_counter()
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.sleep(5)
        await asyncio.to_thread(cluster.restart, victim)
        print(f"  replica 0 killed and serving again after {time.perf_counter() - t0:.1f} s", flush=True)
        before = await asyncio.to_thread(victim.metric, "tuneloop_requests_total")
        while await asyncio.to_thread(victim.metric, "tuneloop_requests_total") <= before:
            await asyncio.sleep(0.2)
        print(f"  ... and taking calls after {time.perf_counter() - t0:.1f} s", flush=True)
        await asyncio.sleep(5)
        stop.set()
        await asyncio.gather(*workers)
    return outcomes


# ------------------------------------------------------------------------ 4. feedback ingest
async def ingest_events_per_s(url: str, events: int) -> float:
    completions = seed_completions(url)
    server = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), url], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])  # type: ignore[union-attr]
        await bench_batches(port, make_events("warm", 2000, completions), 500, 4)
        return await bench_batches(port, make_events("bulk", events, completions), 500, 4)
    finally:
        server.terminate()
        server.wait(30)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-bench-replicas-"))
    postgres = PostgresServer()
    postgres.start()
    s3 = start_s3() if args.registry == "s3" else None
    cluster: ReplicaSet | None = None
    try:
        sqlite_rate = await ingest_events_per_s(f"sqlite:///{tmp}/ingest.db", args.events)
        pg_rate = await ingest_events_per_s(postgres.create_database(), args.events)
        print(f"feedback ingest: PostgreSQL {pg_rate:.0f} events/s, SQLite {sqlite_rate:.0f} events/s "
              f"(batches of 500 from 4 clients, {args.events} events); pg/sqlite {pg_rate / sqlite_rate:.2f}",
              flush=True)  # fmt: skip

        model_dir = ensure_default_model()
        if s3 is not None:
            url = "s3://tuneloop-bench/registry"
            registry_flags = ["--registry-url", url]
            registry = open_registry(url, tmp / "publisher-cache")
        else:
            registry_flags = ["--adapter-dir", str(tmp / "registry")]
            registry = open_registry("", tmp / "registry")
        loras = make_loras(model_dir, tmp, seeds=(1, 2))
        manifest = {"base_model": base_model_fingerprint(model_dir), "metrics": {"heldout_accuracy": 0.8}}
        cluster = ReplicaSet(
            model_dir=model_dir,
            store_url=postgres.create_database(),
            root=tmp,
            registry_flags=registry_flags,
            flags=["--default-adapter", NAME, "--max-num-seqs", str(max(args.streams, 16)), "--durable-completions"],
            pin_cores=not args.no_pin,
        )
        cluster.start()
        print(f"two replicas serving ({args.registry} registry, PostgreSQL store), logs in {tmp}", flush=True)

        for address in cluster.addresses:  # each engine's first batches are slower: not in the figures
            await stream_tokens(address, args.streams, 1, args.max_tokens)
        alone = [await stream_tokens(a, args.streams, args.requests, args.max_tokens) for a in cluster.addresses]
        two, failed_two = await stream_tokens(cluster.addresses, args.streams, args.requests, args.max_tokens)
        one = statistics.mean(rate for rate, _ in alone)
        print(f"throughput, {args.streams} streams x {args.requests} x {args.max_tokens} tokens: each replica alone "
              f"{', '.join(f'{rate:.1f}' for rate, _ in alone)} tokens/s (mean {one:.1f}), both {two:.1f} tokens/s; "
              f"two/one {two / one:.2f} (failed calls {sum(f for _, f in alone)}, {failed_two})",
              flush=True)  # fmt: skip

        print(f"publish -> every replica serving, {args.publishes} publishes:", flush=True)
        switched = publish_to_all_serving(cluster, registry, loras, manifest, args.publishes, args.publish_interval)

        print(f"one replica SIGKILLed and restarted under {args.streams} workers:", flush=True)
        outcomes = await kill_under_load(cluster, args.streams, min(args.max_tokens, 16))
        for key in sorted(outcomes):
            print(f"  {key}: {outcomes[key]}")
        retried_failed = sum(n for k, n in outcomes.items() if "failed" in k and not k.startswith("stream"))
        print(f"failed retried calls (generate, feedback): {retried_failed} (goal 0)")
    finally:
        if cluster is not None:
            cluster.stop()
        if s3 is not None:
            s3.terminate()
            s3.wait(10)
        postgres.stop()
    print(f"publish -> all replicas serving: p50 {statistics.median(switched):.2f} s, max {max(switched):.2f} s "
          f"over {len(switched)} (goal p50 <= 1.5)")  # fmt: skip
    print(f"replicas_all_switched_p50_s: {statistics.median(switched):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (and load workers)")
    parser.add_argument("--requests", type=int, default=4, help="streams per worker in the throughput runs")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--publishes", type=int, default=5, help="versions published for the switch timing")
    parser.add_argument(
        "--publish-interval", type=float, default=5.0, help="seconds between one publish being served and the next"
    )
    parser.add_argument("--events", type=int, default=20_000, help="feedback events per store in the ingest runs")
    parser.add_argument("--registry", choices=["s3", "dir"], default="s3", help="object store (moto) or directory")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave vLLM's core binding as it is (every engine on core 0)"
    )
    asyncio.run(main(parser.parse_args()))
