"""The local-directory registry: versioned LoRA adapters in a directory, with named channels.

Layout:

    <root>/<name>/versions/<version>/   adapter_config.json, adapter_model.safetensors, manifest.json
    <root>/<name>/channels/<channel>.json   {"version": "v3", "updated_at": ...}
    <root>/<name>/channels/<channel>.log    one JSON line per channel move (for rollback)
    <root>/<name>/channels/canary.json      {"version", "share", "started_at", "auto_decide"} while a
                                            canary runs; canary.log records each start and verdict
    <root>/<name>/.lock                     fcntl lock held while a version or a channel is written

The trainer publishes and the server reads. Readers take no lock: every write becomes visible by
one `rename`, so a reader sees a whole version or none, and a channel file is always complete.
A publisher that dies mid-way leaves at most a hidden `.staging-*` directory, which is never
listed and is removed by the next publish. Processes on one host (or sharing one POSIX
filesystem) share it; replicas on several hosts share `objectstore.py`'s registry instead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from ..errors import FailedPrecondition, NotFound
from .base import (
    ACCEPTED,
    ADAPTER_FILES,
    CANARY_CHANNEL,
    DEFAULT_CHANNEL,
    MANIFEST,
    NAME_RE,
    REJECTED,
    VERSION_RE,
    AdapterVersion,
    CanaryEntry,
    CorruptEntry,
    check_publish,
    check_servable,
    check_settable,
    check_share,
    default_registry_dir,
    parse_canary,
    parse_channel,
    read_json,
    validate_name,
    version_number,
)

log = logging.getLogger(__name__)

_STAGING_PREFIX = ".staging-"
_SETTLED_NS = 3_000_000_000  # see AdapterRegistry._channel_cache
_T = TypeVar("_T")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory that holds it is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class AdapterRegistry:
    """The local-directory `Registry`; safe for one writer per name at a time across processes
    (fcntl), and for any number of lock-free readers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) if str(root) else default_registry_dir()
        # Channel files last read, by path: (inode, mtime ns, size) -> parsed. The server polls
        # every channel many times a second; a stat is ~10x cheaper than open + read + parse.
        # Only files last changed over _SETTLED_NS ago are cached: a filesystem may reuse a freed
        # inode at once and stamp times at a coarse tick, so two quick moves could otherwise look
        # like none (git's "racy stat" rule). A later move always gets a newer mtime than that.
        self._channel_cache: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    # -- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[AdapterVersion]:
        """All readable versions, oldest first; corrupt ones are logged and skipped."""
        vdir = self.root / validate_name(name) / "versions"
        if not vdir.is_dir():
            return []
        found: list[AdapterVersion] = []
        for p in vdir.iterdir():
            if not VERSION_RE.fullmatch(p.name):
                continue  # staging dirs and stray files are never versions
            try:
                found.append(self._load(name, p.name))
            except CorruptEntry as exc:
                log.warning("adapter registry: skipping %s/%s: %s", name, p.name, exc)
        return sorted(found, key=lambda v: v.number)

    def corrupt_versions(self, name: str) -> list[tuple[str, str]]:
        """`(version, reason)` for each version directory that `versions` skips."""
        vdir = self.root / validate_name(name) / "versions"
        bad: list[tuple[str, str]] = []
        if vdir.is_dir():
            for p in sorted(vdir.iterdir(), key=lambda q: q.name):
                if VERSION_RE.fullmatch(p.name):
                    try:
                        self._load(name, p.name)
                    except CorruptEntry as exc:
                        bad.append((p.name, str(exc)))
        return bad

    def get(self, name: str, version: str) -> AdapterVersion:
        validate_name(name)
        version_number(version)
        path = self.root / name / "versions" / version
        if not path.is_dir():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise NotFound(f"adapter {name} has no version {version} (known versions: {known})")
        try:
            return self._load(name, version)
        except CorruptEntry as exc:
            raise NotFound(f"adapter {name} version {version} is unreadable: {exc}") from exc

    def channel(self, name: str, channel: str = DEFAULT_CHANNEL) -> str | None:
        info = self.channel_info(name, channel)
        return info[0] if info else None

    def channel_info(self, name: str, channel: str = DEFAULT_CHANNEL) -> tuple[str, float] | None:
        """The channel's version and when it was last moved (unix seconds), or None if unset."""
        path = self.root / validate_name(name) / "channels" / f"{validate_name(channel, 'channel')}.json"

        return self._read_channel_file(path, parse_channel)

    def canary(self, name: str) -> CanaryEntry | None:
        """The running canary of `name`, or None."""
        path = self.root / validate_name(name) / "channels" / f"{CANARY_CHANNEL}.json"

        return self._read_channel_file(path, lambda data: parse_canary(data, f"file {path}"))

    def _read_channel_file(self, path: Path, parse: Callable[[dict[str, Any]], _T | None]) -> _T | None:
        """Parse a channel's JSON file, or return what it parsed to while its (inode, mtime, size)
        is unchanged: every replica polls these files several times a second."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._channel_cache.pop(path, None)
            return None
        except OSError as exc:
            log.warning("adapter registry: channel file %s is unreadable: %s", path, exc)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._channel_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self._channel_cache.pop(path, None)
        value = None
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # transient (e.g. permissions being fixed): try again next poll
            log.warning("adapter registry: channel file %s is unreadable: %s", path, exc)
            return None
        except ValueError as exc:  # cached below, so this is logged once per bad write, not per poll
            log.warning("adapter registry: channel file %s is unreadable: %s", path, exc)
        else:
            value = parse(data)
        if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
            self._channel_cache[path] = (stamp, value)
        return value

    def canary_log(self, name: str) -> list[dict[str, Any]]:
        """Every canary start and verdict of `name`, oldest first."""
        path = self.root / validate_name(name) / "channels" / f"{CANARY_CHANNEL}.log"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash mid-append
            if isinstance(event, dict):
                events.append(event)
        return events

    def resolve(self, name: str, version: str = "") -> AdapterVersion:
        """A pinned version, or the one channel `current` points to."""
        if version:
            return self.get(name, version)
        current = self.channel(name, DEFAULT_CHANNEL)
        if current is None:
            if not (self.root / validate_name(name)).is_dir():
                raise NotFound(f"no adapter named {name} in the registry at {self.root}")
            raise NotFound(f"adapter {name} has no '{DEFAULT_CHANNEL}' version yet; pin a version or publish one")
        return self.get(name, current)

    def history(self, name: str, channel: str = DEFAULT_CHANNEL) -> list[str]:
        """The versions the channel pointed to before its present one, oldest first
        (so `history(...)[-1]` is what a rollback returns to)."""
        path = self.root / validate_name(name) / "channels" / f"{validate_name(channel, 'channel')}.log"
        previous: list[str] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                prev = json.loads(line).get("previous")
            except (ValueError, AttributeError):
                continue  # a torn last line from a crash mid-append
            if isinstance(prev, str) and prev:
                previous.append(prev)
        return previous

    def _load(self, name: str, version: str) -> AdapterVersion:
        path = self.root / name / "versions" / version
        missing = [f for f in (*ADAPTER_FILES, MANIFEST) if not (path / f).is_file()]
        if missing:
            raise CorruptEntry(f"missing {', '.join(missing)}")
        try:
            manifest = read_json(path / MANIFEST)
            read_json(path / "adapter_config.json")
        except (OSError, ValueError) as exc:
            raise CorruptEntry(f"unparsable JSON: {exc}") from exc
        if manifest.get("version") != version:
            raise CorruptEntry(f"manifest names version {manifest.get('version')!r}, directory is {version}")
        return AdapterVersion(name=name, version=version, path=path, manifest=manifest)

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        ndir = self.root / name
        ndir.mkdir(parents=True, exist_ok=True)
        with (ndir / ".lock").open("a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield ndir
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def publish(
        self,
        name: str,
        adapter_dir: Path,
        manifest: dict[str, Any],
        *,
        accepted: bool = True,
        channel: str | None = DEFAULT_CHANNEL,
    ) -> AdapterVersion:
        """Copy a peft adapter directory in as the next version, then (if accepted) move `channel`.

        The version is staged in a hidden directory, fsynced, and renamed into place under the
        name's lock, so the number is never reused and a crash leaves no visible half-version.
        A rejected version is stored with its manifest and never moves a channel.
        """
        src, files = check_publish(name, adapter_dir, manifest, channel)
        with self._locked(name) as ndir:
            vdir = ndir / "versions"
            vdir.mkdir(exist_ok=True)
            self._remove_stale_staging(vdir)
            numbers = [int(m.group(1)) for p in vdir.iterdir() if (m := VERSION_RE.fullmatch(p.name))]
            version = f"v{max(numbers, default=0) + 1}"
            full = {
                **manifest,
                "name": name,
                "version": version,
                "status": ACCEPTED if accepted else REJECTED,
                "created_at": time.time(),
            }
            staging = self._stage(vdir, src, files, full)
            self._commit(staging, vdir / version)
            published = self._load(name, version)
            if accepted and channel is not None:
                self._move_channel(ndir, channel, version)
        log.info("adapter registry: published %s/%s (%s)", name, version, full["status"])
        return published

    def set_channel(self, name: str, channel: str, version: str) -> None:
        """Point `channel` at an accepted version, atomically."""
        validate_name(name)
        check_settable(channel)
        check_servable(name, self.get(name, version))
        with self._locked(name) as ndir:
            self._move_channel(ndir, channel, version)

    def start_canary(self, name: str, version: str, share: float, *, auto_decide: bool = True) -> CanaryEntry:
        """Put an accepted version on trial with `share` of default traffic (replacing any
        running canary). Every replica that follows the registry starts routing to it."""
        validate_name(name)
        check_share(share)
        check_servable(name, self.get(name, version))
        with self._locked(name) as ndir:
            if self.channel(name, DEFAULT_CHANNEL) == version:
                raise FailedPrecondition(f"{name}@{version} is already current; a canary must be another version")
            entry = CanaryEntry(version, share, time.time(), auto_decide)
            cdir = ndir / "channels"
            cdir.mkdir(exist_ok=True)
            _write_json_atomic(cdir / f"{CANARY_CHANNEL}.json", asdict(entry))
            self._append_canary_log(cdir, {"event": "started", **asdict(entry), "at": entry.started_at})
        log.info("adapter registry: %s/%s is a canary at %.0f%% of default traffic", name, version, share * 100)
        return entry

    def end_canary(self, name: str, outcome: str, *, expected: str = "", detail: str = "") -> CanaryEntry | None:
        """End the running canary (only if it is `expected`, when given), recording `outcome`
        ("promoted", "rolled_back", "stopped", ...). Returns the ended entry, or None."""
        validate_name(name)
        with self._locked(name) as ndir:
            entry = self.canary(name)
            if entry is None or (expected and entry.version != expected):
                return None
            cdir = ndir / "channels"
            (cdir / f"{CANARY_CHANNEL}.json").unlink()
            _fsync_dir(cdir)
            self._append_canary_log(
                cdir, {"event": outcome, "version": entry.version, "detail": detail, "at": time.time()}
            )
        log.info("adapter registry: canary %s/%s ended: %s", name, entry.version, outcome)
        return entry

    @staticmethod
    def _append_canary_log(cdir: Path, event: dict[str, Any]) -> None:
        with (cdir / f"{CANARY_CHANNEL}.log").open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _remove_stale_staging(vdir: Path) -> None:
        # Staging only exists while the lock is held, so any found now belongs to a dead publisher.
        for p in vdir.iterdir():
            if p.name.startswith(_STAGING_PREFIX):
                log.warning("adapter registry: removing leftover %s from an interrupted publish", p)
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def _stage(vdir: Path, src: Path, files: list[str], manifest: dict[str, Any]) -> Path:
        staging = vdir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        for name in files:
            shutil.copyfile(src / name, staging / name)
            _fsync_file(staging / name)
        with (staging / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(staging)
        return staging

    @staticmethod
    def _commit(staging: Path, final: Path) -> None:
        os.rename(staging, final)
        _fsync_dir(final.parent)

    def _move_channel(self, ndir: Path, channel: str, version: str) -> None:
        cdir = ndir / "channels"
        cdir.mkdir(exist_ok=True)
        for stale in cdir.glob(".*.tmp"):  # under the lock: left by a writer that died
            stale.unlink(missing_ok=True)
        previous = self.channel(ndir.name, channel)
        if previous == version:
            return
        now = time.time()
        _write_json_atomic(cdir / f"{channel}.json", {"version": version, "updated_at": now})
        # The log is appended after the switch: a crash in between loses one history line, never
        # leaves the log claiming a switch that did not happen.
        with (cdir / f"{channel}.log").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"version": version, "previous": previous, "updated_at": now}) + "\n")
            f.flush()
            os.fsync(f.fileno())
