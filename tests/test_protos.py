"""The house in order: the committed gRPC stubs are what protos/generate.sh makes from the
committed .proto files, and the packages pass ruff and mypy (settings in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[1] / "protos"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    shutil.copytree(PROTOS / "tuneloop", tmp_path / "tuneloop", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "tuneloop" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", *protos],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    generated = sorted(p.name for p in (tmp_path / "tuneloop" / "v1").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in (PROTOS / "tuneloop" / "v1").glob("*_pb2*.py*"))
    assert generated == committed
    stale = [
        name
        for name in generated
        if (tmp_path / "tuneloop" / "v1" / name).read_bytes() != (PROTOS / "tuneloop" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale stubs {stale}: run protos/generate.sh and commit the result"


def test_the_packages_pass_ruff() -> None:
    root = PROTOS.parent
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "server", "trainer", "clients", "cli",
         "tests", "bench"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_packages_pass_mypy() -> None:
    # Settings in pyproject.toml ([tool.mypy]); the cache stays out of the tree.
    root = PROTOS.parent
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(Path.home() / ".cache" / "tuneloop-mypy"),
         "server", "trainer", "clients", "cli"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
