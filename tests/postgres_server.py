"""A throwaway PostgreSQL server for the store tests: initdb + postgres in a temp dir on a free
loopback port, run as the `postgres` user when the tests run as root (initdb refuses root).

`TUNELOOP_TEST_POSTGRES_URL` (a postgresql+psycopg:// URL of a database the tests may create
databases from) skips the local server. Without either, the tests skip outside CI and fail in CI
(env CI set): a skipped store test is not a passing one.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (install the Debian package: apt-get install postgresql; "
        "deploy/install.sh does it when run as root)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One postgres process; `url(db)` names a database on it, `create_database` makes a fresh one."""

    def __init__(self) -> None:
        self._bin = _bindir()
        self._as_postgres = os.geteuid() == 0
        self._dir = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._n = 0

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)

    def start(self, timeout_s: float = 60.0) -> None:
        data = self._dir / "data"
        if self._as_postgres:
            shutil.chown(self._dir, "postgres", "postgres")
        subprocess.run(
            self._cmd(str(self._bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
            check=True, capture_output=True,
        )  # fmt: skip
        # fsync off: the tests check the store's logic, not the disk; the server is thrown away.
        self._proc = subprocess.Popen(
            self._cmd(
                str(self._bin / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
                "-k", str(self._dir), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
            ),
            stdout=subprocess.DEVNULL, stderr=open(self._dir / "server.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        ready = [str(self._bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        while subprocess.run(ready).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self._dir / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise PostgresUnavailable(f"postgres did not start: {log}")
            time.sleep(0.1)  # polling readiness, not waiting a fixed time

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        self._n += 1
        name = f"t{self._n}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: smart shutdown
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class ExternalPostgres:
    """A server someone else runs (TUNELOOP_TEST_POSTGRES_URL): fresh databases are created on it."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._n = 0

    def create_database(self) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(self._url)
        self._n += 1
        name = f"tuneloop_test_{os.getpid()}_{self._n}"
        conninfo = u.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")
            c.execute(f"CREATE DATABASE {name}")
        return u.set(database=name).render_as_string(hide_password=False)

    def stop(self) -> None:
        pass
