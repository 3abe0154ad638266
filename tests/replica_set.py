"""Several `tuneloop serve` processes on one store and one adapter registry, as an operator runs
them: each its own process group (engine core included), its own TUNELOOP_HOME (journal, model
cache), its log in a file, its ports read from the start-up line. Used by tests/test_replicas.py
and bench/replicas.py.

A replica is killed with SIGKILL to its whole process group (a host or container dying: nothing
drains) and restarted on the same port, so a client's fixed address list finds it again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.client.balancing import HEALTH_SERVICE

_STARTED = re.compile(r"gRPC on [^:]+:(\d+), metrics on :(\S+);")


@dataclass
class Replica:
    index: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "serve.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples whose labels include `labels`, read from /metrics."""
        assert self.metrics_port, "this replica serves no metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


@dataclass
class ReplicaSet:
    """`count` replicas of `tuneloop serve` sharing `store_url` and `registry_flags` (the registry:
    `--adapter-dir DIR`, or `--registry-url ...`). `flags` are added to every replica's command.

    `pin_cores` binds replica i's engine to core i (modulo the host's cores): vLLM's CPU backend
    binds every engine on a host to the same core otherwise, so replicas on one host would share
    one core and leave the others idle.
    """

    model_dir: Path
    store_url: str
    root: Path
    registry_flags: Sequence[str]
    count: int = 2
    flags: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    pin_cores: bool = False
    replicas: list[Replica] = field(init=False)

    def __post_init__(self) -> None:
        self.replicas = [Replica(i, self.root / f"replica-{i}") for i in range(self.count)]

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def _command(self, replica: Replica) -> list[str]:
        return [
            sys.executable, "-m", "tuneloop.server.main",
            "--host", "127.0.0.1", "--port", str(replica.port), "--metrics-port", "0",
            "--model", str(self.model_dir), "--store-url", self.store_url, *self.registry_flags, *self.flags,
        ]  # fmt: skip

    def launch(self, replica: Replica) -> None:
        """Starts the replica's process (on its old port when it had one) and waits until its port is
        bound; its engine goes on starting (see `wait_serving`)."""
        replica.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TUNELOOP_HOME": str(replica.home), "VLLM_CPU_KVCACHE_SPACE": "1", **self.env}
        if self.pin_cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(replica.index % (os.cpu_count() or 1))
        # A restart appends to the log: its start-up line is looked for after the earlier runs'.
        start = len(replica.log.read_text(errors="replace")) if replica.log.exists() else 0
        with open(replica.log, "a") as log:
            replica.proc = subprocess.Popen(
                self._command(replica), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while not (m := _STARTED.search(replica.log.read_text(errors="replace"), start)):
            if replica.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.index} did not bind its port:\n{replica.log_tail()}")
            time.sleep(0.2)
        replica.port = int(m.group(1))
        replica.metrics_port = int(m.group(2)) if m.group(2).isdigit() else None

    def start(self, timeout: float = 600) -> None:
        """Starts every replica: one at a time until each has opened the store (so only one creates
        the schema of a fresh database), their engines then starting side by side."""
        for replica in self.replicas:
            self.launch(replica)
        for replica in self.replicas:
            self.wait_serving(replica, timeout)

    def wait_serving(self, replica: Replica, timeout: float = 600) -> None:
        """Waits for the replica's health to say SERVING, on its Watch stream (no polling)."""
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        with grpc.insecure_channel(replica.address) as channel:
            try:
                for update in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=timeout):
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                raise RuntimeError(
                    f"replica {replica.index} not serving ({exc.code().name}):\n{replica.log_tail()}"
                ) from None
        raise RuntimeError(f"replica {replica.index} ended its health stream:\n{replica.log_tail()}")

    def kill(self, replica: Replica) -> None:
        """SIGKILL to the replica's process group: the server and its engine core die at once."""
        assert replica.proc is not None
        os.killpg(replica.proc.pid, signal.SIGKILL)
        replica.proc.wait(30)

    def restart(self, replica: Replica, timeout: float = 600) -> None:
        self.launch(replica)
        self.wait_serving(replica, timeout)

    def terminate(self, replica: Replica, timeout: float = 60) -> int:
        """SIGTERM (drain), then the exit status; SIGKILL to the group if it outlives `timeout`."""
        assert replica.proc is not None
        if replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGTERM)
            try:
                return replica.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(replica.proc.pid, signal.SIGKILL)
        return replica.proc.wait(30)

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None:
                self.terminate(replica)
