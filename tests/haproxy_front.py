"""The real HAProxy with the shipped deploy/haproxy/haproxy.cfg in front of given replicas, for
tests/test_haproxy.py (scripted replicas) and tests/test_replicas.py (real ones)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str:
    """The haproxy binary; skips the test without one (fails it in CI, which must run it)."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(binary):
        if os.environ.get("CI"):
            pytest.fail("CI must exercise the HAProxy front: deploy/install.sh installs the haproxy package")
        pytest.skip("no haproxy binary (deploy/install.sh installs Debian's haproxy package)")
    return binary


@contextmanager
def haproxy_front(replicas: Sequence[str], log: Path) -> Iterator[str]:
    """Runs HAProxy in the foreground with the shipped config in front of `replicas` (host:port,
    up to four); yields its host:port once it accepts connections."""
    binary = haproxy_binary()
    with socket.socket() as s:  # HAProxy cannot report a port it picked: take a free one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "TUNELOOP_HAPROXY_BIND": f"127.0.0.1:{port}",
        **{f"TUNELOOP_REPLICA_{i + 1}": address for i, address in enumerate(replicas)},
    }
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:  # listening once a connection is accepted
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"haproxy did not listen on {port}:\n{log.read_text()}"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
