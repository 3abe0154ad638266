"""Fuzz a running `tuneloop serve` through its public gRPC API, with many more examples than CI.

Starts the server as its own process (the real model, a fresh store and registry), then draws
hostile and absurd requests for every RPC from tests/api_fuzz.py (wire-level: invalid UTF-8,
unknown enum numbers, NaN and infinite floats, huge repeated fields, undecodable bytes) and
checks every answer: OK or a precise status with a plain message, and health still SERVING
after each RPC's batch. A bad answer is printed with the request that caused it.

    .venv/bin/python bench/fuzz.py [--examples 500] [--seed 0]

The last line is `fuzz_bad_answers: N` (goal 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from procs import start, stop, wait_port, wait_serving

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the strategies are the test suite's, shared

from api_fuzz import METHODS, fuzz_method  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500, help="requests drawn per RPC")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same seed draws the same requests)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "fuzz", help="where the server log goes")
    args = ap.parse_args()
    if args.examples < 1:
        ap.error("--examples must be >= 1")

    from tuneloop.server.model_cache import ensure_default_model

    model_dir = ensure_default_model()
    home = Path(tempfile.mkdtemp(prefix="tuneloop-fuzz-"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "server.log"
    env = {**os.environ, "TUNELOOP_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Small generation limits: what the fuzz exercises is validation, not decoding speed.
    server = start([sys.executable, "-m", "tuneloop.server.main", "--port", "0", "--metrics-port", "-1",
                    "--model", str(model_dir), "--max-model-len", "512", "--max-tokens-limit", "8",
                    "--default-max-tokens", "4"], log, env)  # fmt: skip
    bad: list[str] = []
    t0 = time.time()
    try:
        port = wait_port(log, server)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
            wait_serving(channel)
            health = health_pb2_grpc.HealthStub(channel)
            for method in METHODS:
                found = fuzz_method(channel, method, args.examples, seed=args.seed)
                bad += found
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    bad.append(f"{method.name}: health is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
                print(f"{method.containing_service.name}.{method.name}: {args.examples} requests, "
                      f"{len(found)} bad answers ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        stop(server)
    for line in bad[:50]:
        print(line)
    print(f"fuzz_bad_answers: {len(bad)}")


if __name__ == "__main__":
    main()
