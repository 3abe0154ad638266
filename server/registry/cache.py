"""The local copies of a shared registry's versions, in the directory vLLM loads adapters from.

    <cache_dir>/.fetched/<16 hex of the registry URL>/<name>/versions/<version>/   files + manifest.json

A version is installed whole or not at all: its files are put into a temporary directory beside
its place, each checked against the size and sha256 its manifest lists, and the directory renamed
into place. Versions are immutable, so an installed one is used as it is from then on, by every
process that shares the directory (a second process that fetched the same version meanwhile
finds the place taken, and uses what is there: the same files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import MANIFEST, AdapterVersion, CorruptEntry

log = logging.getLogger(__name__)

# One subdirectory per registry URL, so a directory that also held a local registry (or another
# bucket's versions) never mixes versions that share a name.
CACHE_SUBDIR = ".fetched"
_TMP_PREFIX = ".fetch-"
# A temporary directory this old belongs to a process that died mid-download.
_STALE_TMP_S = 3600.0
_CHUNK = 1 << 20


def cache_root(cache_dir: Path, url: str) -> Path:
    """Where versions fetched from `url` are kept under `cache_dir`."""
    return cache_dir / CACHE_SUBDIR / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, as a manifest lists it."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str, version: str) -> Path:
        return self.root / name / "versions" / version

    def load(self, name: str, version: str) -> AdapterVersion | None:
        """The installed version, or None if it is not here."""
        local = self.path(name, version)
        try:
            manifest = json.loads((local / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # only a disk fault does this: the manifest is written before the rename
            log.warning("adapter registry: cached %s/%s is damaged; fetching it again", name, version)
            shutil.rmtree(local, ignore_errors=True)
            return None
        return AdapterVersion(name, version, local, manifest)

    def install(
        self, name: str, version: str, manifest: dict[str, Any], put: Callable[[str, Path], None]
    ) -> AdapterVersion:
        """Put each file the manifest lists into place (`put(file, dest)`), verified; raises
        CorruptEntry, leaving nothing behind, if one does not match."""
        local = self.path(name, version)
        parent = local.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale(parent)
        tmp = parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for file, expected in manifest["files"].items():
                put(file, tmp / file)
                size, digest = file_digest(tmp / file)
                if (size, digest) != (expected.get("size"), expected.get("sha256")):
                    raise CorruptEntry(f"{file} does not match its manifest (size {size}, sha256 {digest[:12]}...)")
                _fsync(tmp / file)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            try:
                os.rename(tmp, local)
            except OSError:
                if not (local / MANIFEST).is_file():
                    raise
            else:
                _fsync(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return AdapterVersion(name, version, local, manifest)

    @staticmethod
    def _remove_stale(parent: Path) -> None:
        now = time.time()
        for p in parent.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(p, ignore_errors=True)
