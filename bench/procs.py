"""Run tuneloop's own processes (`tuneloop serve`, the trainer sidecar) for a bench, as a user would:
separate processes, logs to files, the port read from the start-up line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _unwind_on_sigterm() -> None:
    # Children run in their own session, so a signal to the bench does not reach them; the bench's
    # `finally: stop(...)` stops them in order. SIGTERM's default would skip that and leave them
    # running: make it unwind like Ctrl-C does.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    _unwind_on_sigterm()
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_port(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(r"gRPC on [^:]+:(\d+)", log.read_text())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        time.sleep(0.5)
    raise RuntimeError("server did not bind in time")


def wait_serving(channel: grpc.Channel, timeout: float = 300) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:  # a server busy starting its engine on a loaded host may answer late
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        time.sleep(1)
    raise RuntimeError("engine did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
