"""`tuneloop serve` as a real process: health before and after the engine is ready, engine death,
and a SIGTERM that drains the completion log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_health_follows_the_engine_and_sigterm_drains_the_log(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "TUNELOOP_HOME": str(tmp_path), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneloop.server.main",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--model",
                str(model_dir),
                "--max-model-len",
                "512",
                "--max-tokens-limit",
                "256",
                "--store-url",
                f"sqlite:///{db}",
                "--grace-period-s",
                "10",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        port = 0

        def bound() -> bool:
            nonlocal port
            m = re.search(r"gRPC on [^:]+:(\d+)", log_path.read_text())
            port = int(m.group(1)) if m else 0
            return port > 0 or proc.poll() is not None

        _wait_for(bound, 60, "the server to bind")
        assert proc.poll() is None, log_path.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            gen = pb_grpc.GenerationServiceStub(ch)
            # The port answers while the engine starts: health NOT_SERVING, generation UNAVAILABLE.
            assert _health(health) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                gen.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in err.value.details()

            _wait_for(lambda: _health(health) == SERVING, 180, "the engine to be ready")
            assert _health(health, "tuneloop.v1.GenerationService") == SERVING
            ids = [
                gen.Generate(
                    pb.GenerateRequest(prompt=f"Count to {i}:", sampling=pb.SamplingParams(max_tokens=8)), timeout=60
                )
                .completions[0]
                .completion_id
                for i in range(3)
            ]

            # Kill the engine core under the server: health flips, requests get UNAVAILABLE.
            cores = [
                c
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()
            ]
            assert cores, [c.name() for c in psutil.Process(proc.pid).children(recursive=True)]
            for c in cores:
                c.send_signal(signal.SIGKILL)
            _wait_for(lambda: _health(health) == NOT_SERVING, 30, "health to report NOT_SERVING")
            with pytest.raises(grpc.RpcError) as err:
                gen.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=4)), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    from tuneloop.server.store import open_store

    store = open_store(f"sqlite:///{db}")
    try:
        for cid in ids:
            assert store.get_completion(cid) is not None, cid
    finally:
        store.close()


@pytest.mark.parametrize("which", ["port", "metrics-port"])
def test_a_port_in_use_is_one_clear_line_and_exit_1(which: str, model_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"port": "0", "metrics-port": "-1", which: port}
        proc = subprocess.run(
            [sys.executable, "-m", "tuneloop.server.main", "--model", str(model_dir),
             "--port", ports["port"], "--metrics-port", ports["metrics-port"]],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TUNELOOP_HOME": str(tmp_path)},
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneloop serve: cannot ") and f":{port}" in last and f"another --{which}" in last, last
    assert "Traceback" not in proc.stderr, proc.stderr
