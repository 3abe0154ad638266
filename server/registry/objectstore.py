"""The shared registry: versioned LoRA adapters on an object store (S3 through fsspec), read and
written by every serving replica and trainer that names the same `registry_url`.

Layout under the URL's prefix:

    <name>/versions/<version>/claim.json      created only-if-absent: allocates the version number
    <name>/versions/<version>/adapter_config.json, adapter_model.safetensors, [report.md, report.png]
    <name>/versions/<version>/manifest.json   written last, only-if-absent; lists each file's size
                                              and sha256. A version without it is not (yet) a version
    <name>/state.json                         channels, their move history, the canary and its log:
                                              one small JSON object replaced only-if-unchanged (ETag)

Why it is safe with many writers and no lock service:
- A version number is taken by the one publisher whose create-only `claim.json` write succeeds, so
  two trainers publishing at once get different numbers, and a number whose publisher died stays
  taken (a gap), never reused for other weights.
- A reader sees a version only once its manifest exists, and the manifest is uploaded after every
  file it lists: never half a version.
- Every channel move and canary start or end is a read-modify-write of `state.json` that commits
  only if nobody wrote it meanwhile (else it reads again and retries), so concurrent writers
  serialise as the local registry's fcntl lock makes them, with no lost update.

Reading a version (`get`, `resolve`) fetches its files into a local directory vLLM loads from
(`cache.py`: verified against the manifest, whole or not at all, reused for good).

Polling is cheap: `channel_info` and `canary` cost one HEAD request each and parse `state.json`
again only when its ETag changed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition, NotFound, Unavailable
from .base import (
    ACCEPTED,
    ADAPTER_FILES,
    DEFAULT_CHANNEL,
    MANIFEST,
    NAME_RE,
    REJECTED,
    REPORT_FILES,
    VERSION_RE,
    AdapterVersion,
    CanaryEntry,
    CorruptEntry,
    check_publish,
    check_servable,
    check_settable,
    check_share,
    parse_canary,
    parse_channel,
    validate_name,
    version_number,
)
from .blobs import Blobs, open_blobs
from .cache import VersionCache, cache_root, file_digest

log = logging.getLogger(__name__)

CLAIM = "claim.json"
STATE = "state.json"
# Publishers claim the next free number; each lost race moves one number up.
_CLAIM_ATTEMPTS = 64
# Writers of one name's state retry on a lost compare-and-swap; a few suffice unless writers spin.
_UPDATE_ATTEMPTS = 20

State = dict[str, Any]


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise CorruptEntry(f"unparsable JSON in {what}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise CorruptEntry(f"{what} does not hold a JSON object")
    return parsed


class ObjectStoreRegistry:
    """The `Registry` on an object store, for any number of replicas and trainers at once."""

    def __init__(self, blobs: Blobs, cache_dir: Path) -> None:
        self.blobs = blobs
        self.url = blobs.url
        self.cache = VersionCache(cache_root(cache_dir, blobs.url))
        # Immutable once published, so kept for the process's life: manifests by (name, version),
        # and the versions whose files sit verified in the cache.
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self._fetched: dict[tuple[str, str], AdapterVersion] = {}
        # state.json as last parsed, by name: (ETag, state). A poll HEADs the object and parses
        # again only when the ETag moved.
        self._states: dict[str, tuple[str, State]] = {}

    @classmethod
    def open(cls, url: str, cache_dir: Path) -> ObjectStoreRegistry:
        """Raises `RegistryUnavailable` (naming the setting) when the store cannot be used."""
        return cls(open_blobs(url), cache_dir)

    def __repr__(self) -> str:
        return f"ObjectStoreRegistry({self.url!r}, cache={str(self.cache.root)!r})"

    # -- reading: versions ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(n for n in self.blobs.children("") if NAME_RE.fullmatch(n))

    def _version_names(self, name: str) -> list[str]:
        found = [v for v in self.blobs.children(f"{name}/versions") if VERSION_RE.fullmatch(v)]
        return sorted(found, key=version_number)

    def _manifest(self, name: str, version: str) -> dict[str, Any]:
        key = (name, version)
        if key in self._manifests:
            return self._manifests[key]
        blob = self.blobs.read(f"{name}/versions/{version}/{MANIFEST}")
        if blob is None:
            raise CorruptEntry("no manifest: being published, or its publisher died before finishing")
        manifest = _parse_json(blob.data, MANIFEST)
        if manifest.get("version") != version:
            raise CorruptEntry(f"manifest names version {manifest.get('version')!r}, its key is {version}")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CorruptEntry("manifest lists no files")
        missing = [f for f in ADAPTER_FILES if f not in files]
        if missing:
            raise CorruptEntry(f"missing {', '.join(missing)}")
        unknown = [f for f in files if f not in (*ADAPTER_FILES, *REPORT_FILES)]
        if unknown:
            raise CorruptEntry(f"manifest lists unexpected files {unknown}")
        self._manifests[key] = manifest
        return manifest

    def _described(self, name: str, version: str) -> AdapterVersion:
        """The version as its manifest describes it; `path` holds its files only once fetched."""
        fetched = self._fetched.get((name, version))
        if fetched is not None:
            return fetched
        return AdapterVersion(name, version, self.cache.path(name, version), self._manifest(name, version))

    def versions(self, name: str) -> list[AdapterVersion]:
        """All readable versions, oldest first, from their manifests (their files are fetched by
        `get` and `resolve`, not here); corrupt and unfinished ones are logged and skipped."""
        validate_name(name)
        found: list[AdapterVersion] = []
        for version in self._version_names(name):
            try:
                found.append(self._described(name, version))
            except CorruptEntry as exc:
                log.warning("adapter registry: skipping %s/%s: %s", name, version, exc)
        return found

    def corrupt_versions(self, name: str) -> list[tuple[str, str]]:
        """`(version, reason)` for each version that `versions` skips."""
        validate_name(name)
        bad: list[tuple[str, str]] = []
        for version in self._version_names(name):
            try:
                self._described(name, version)
            except CorruptEntry as exc:
                bad.append((version, str(exc)))
        return bad

    def get(self, name: str, version: str) -> AdapterVersion:
        """The version with its files in the local cache (fetched and verified on first use)."""
        validate_name(name)
        version_number(version)
        key = (name, version)
        if key in self._fetched:
            return self._fetched[key]
        try:
            found = self.cache.load(name, version) or self._fetch(name, version, self._manifest(name, version))
        except CorruptEntry as exc:
            if version not in self._version_names(name):
                known = ", ".join(v.version for v in self.versions(name)) or "none"
                raise NotFound(f"adapter {name} has no version {version} (known versions: {known})") from None
            raise NotFound(f"adapter {name} version {version} is unreadable: {exc}") from exc
        self._manifests[key] = found.manifest
        self._fetched[key] = found
        return found

    def _fetch(self, name: str, version: str, manifest: dict[str, Any]) -> AdapterVersion:
        def download(file: str, dest: Path) -> None:
            try:
                self.blobs.download(f"{name}/versions/{version}/{file}", dest)
            except FileNotFoundError:
                raise CorruptEntry(f"{file} is listed in the manifest but missing from the store") from None

        started = time.monotonic()
        found = self.cache.install(name, version, manifest, download)
        log.info(
            "adapter registry: fetched %s/%s into %s in %.2f s", name, version, found.path, time.monotonic() - started
        )
        return found

    def resolve(self, name: str, version: str = "") -> AdapterVersion:
        """A pinned version, or the one channel `current` points to."""
        if version:
            return self.get(name, version)
        current = self.channel(name, DEFAULT_CHANNEL)
        if current is None:
            if not self.blobs.children(validate_name(name)):
                raise NotFound(f"no adapter named {name} in the registry at {self.url}")
            raise NotFound(f"adapter {name} has no '{DEFAULT_CHANNEL}' version yet; pin a version or publish one")
        return self.get(name, current)

    # -- reading: channels and the canary ------------------------------------------------------
    def _polled_state(self, name: str) -> State:
        """state.json, parsed again only when its ETag moved (one HEAD per call otherwise)."""
        key = f"{name}/{STATE}"
        etag = self.blobs.etag(key)
        if etag is None:
            self._states.pop(name, None)
            return {}
        cached = self._states.get(name)
        if cached is not None and cached[0] == etag:
            return cached[1]
        blob = self.blobs.read(key)
        if blob is None:
            self._states.pop(name, None)
            return {}
        state = self._parse_state(name, blob.data)
        self._states[name] = (blob.etag, state)  # a bad object is cached too: logged once, not per poll
        return state

    @staticmethod
    def _parse_state(name: str, data: bytes) -> State:
        """The state with any malformed part dropped (and logged here, once per write of it,
        not on every poll): a bad canary reads as none, a bad channel table as no channels."""
        try:
            state = _parse_json(data, f"{name}/{STATE}")
        except CorruptEntry as exc:
            log.warning("adapter registry: %s; its channels read as unset until the next move", exc)
            return {}
        for part, kind in (("channels", dict), ("history", dict), ("canary_log", list)):
            if part in state and not isinstance(state[part], kind):
                log.warning("adapter registry: %s/%s: %r is not a JSON %s; ignored", name, STATE, part, kind.__name__)
                del state[part]
        if state.get("canary") is not None and parse_canary(state["canary"], f"of {name}") is None:
            del state["canary"]
        return state

    def channel(self, name: str, channel: str = DEFAULT_CHANNEL) -> str | None:
        info = self.channel_info(name, channel)
        return info[0] if info else None

    def channel_info(self, name: str, channel: str = DEFAULT_CHANNEL) -> tuple[str, float] | None:
        """The channel's version and when it was last moved (unix seconds), or None if unset."""
        validate_name(name)
        validate_name(channel, "channel")
        return _channel_of(self._polled_state(name), channel)

    def canary(self, name: str) -> CanaryEntry | None:
        validate_name(name)
        return _canary_of(name, self._polled_state(name))

    def history(self, name: str, channel: str = DEFAULT_CHANNEL) -> list[str]:
        """The versions the channel pointed to before its present one, oldest first."""
        validate_name(name)
        moves = self._polled_state(name).get("history", {}).get(validate_name(channel, "channel"))
        if not isinstance(moves, list):
            return []
        return [m["previous"] for m in moves if isinstance(m, dict) and isinstance(m.get("previous"), str)]

    def canary_log(self, name: str) -> list[dict[str, Any]]:
        validate_name(name)
        return [e for e in self._polled_state(name).get("canary_log", []) if isinstance(e, dict)]

    # -- writing -------------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        adapter_dir: Path,
        manifest: dict[str, Any],
        *,
        accepted: bool = True,
        channel: str | None = DEFAULT_CHANNEL,
    ) -> AdapterVersion:
        """Upload a peft adapter directory as the next version, then (if accepted) move `channel`.

        The number is claimed first (create-only), the files uploaded, the manifest last; a
        publisher that dies leaves a claimed number with no manifest, which is skipped by readers
        and never reused. A rejected version is stored with its manifest and never moves a channel.
        """
        src, files = check_publish(name, adapter_dir, manifest, channel)
        listed = {}
        for f in files:
            size, digest = file_digest(src / f)
            listed[f] = {"size": size, "sha256": digest}
        version = self._claim(name)
        full = {
            **manifest,
            "name": name,
            "version": version,
            "status": ACCEPTED if accepted else REJECTED,
            "created_at": time.time(),
            "files": listed,
        }
        prefix = f"{name}/versions/{version}"
        for f in files:
            self.blobs.upload(src / f, f"{prefix}/{f}")
        body = json.dumps(full, indent=2, sort_keys=True, default=str).encode()
        if not self.blobs.create(f"{prefix}/{MANIFEST}", body):
            # Present already: our own write, if the client retried one whose answer was lost.
            existing = self.blobs.read(f"{prefix}/{MANIFEST}")
            if existing is None or existing.data != body:
                raise Unavailable(f"adapter {name} {version} was claimed by this publisher but holds another manifest")
        full = json.loads(body)  # exactly what readers will parse (default=str applied)
        self._manifests[(name, version)] = full
        published = self.cache.install(name, version, full, _copier(src))
        self._fetched[(name, version)] = published
        if accepted and channel is not None:
            self._update(name, lambda state: _move(state, channel, version))
        log.info("adapter registry: published %s/%s (%s) to %s", name, version, full["status"], self.url)
        return published

    def _claim(self, name: str) -> str:
        numbers = [version_number(v) for v in self._version_names(name)]
        number = max(numbers, default=0) + 1
        claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "claimed_at": time.time()}).encode()
        for _ in range(_CLAIM_ATTEMPTS):
            if self.blobs.create(f"{name}/versions/v{number}/{CLAIM}", claim):
                return f"v{number}"
            number += 1  # another publisher holds it
        raise Unavailable(
            f"adapter {name}: {_CLAIM_ATTEMPTS} version numbers in a row were taken by other publishers; retry"
        )

    def set_channel(self, name: str, channel: str, version: str) -> None:
        """Point `channel` at an accepted version."""
        validate_name(name)
        check_settable(channel)
        self._require_accepted(name, version)
        self._update(name, lambda state: _move(state, channel, version))

    def _require_accepted(self, name: str, version: str) -> None:
        version_number(version)
        try:
            target = self._described(name, version)
        except CorruptEntry as exc:
            if version not in self._version_names(name):
                raise NotFound(f"adapter {name} has no version {version}") from None
            raise NotFound(f"adapter {name} version {version} is unreadable: {exc}") from exc
        check_servable(name, target)

    def start_canary(self, name: str, version: str, share: float, *, auto_decide: bool = True) -> CanaryEntry:
        """Put an accepted version on trial with `share` of default traffic (replacing any
        running canary). Every replica that follows the registry starts routing to it."""
        validate_name(name)
        check_share(share)
        self._require_accepted(name, version)
        entry = CanaryEntry(version, share, time.time(), auto_decide)

        def start(state: State) -> bool:
            if _channel_version(state, DEFAULT_CHANNEL) == version:
                raise FailedPrecondition(f"{name}@{version} is already current; a canary must be another version")
            state["canary"] = asdict(entry)
            state.setdefault("canary_log", []).append({"event": "started", **asdict(entry), "at": entry.started_at})
            return True

        self._update(name, start)
        log.info("adapter registry: %s/%s is a canary at %.0f%% of default traffic", name, version, share * 100)
        return entry

    def end_canary(self, name: str, outcome: str, *, expected: str = "", detail: str = "") -> CanaryEntry | None:
        """End the running canary (only if it is `expected`, when given), recording `outcome`.
        Returns the ended entry, or None."""
        validate_name(name)
        ended: list[CanaryEntry] = []

        def end(state: State) -> bool:
            ended.clear()
            entry = _canary_of(name, state)
            if entry is None or (expected and entry.version != expected):
                return False
            state.pop("canary", None)
            state.setdefault("canary_log", []).append(
                {"event": outcome, "version": entry.version, "detail": detail, "at": time.time()}
            )
            ended.append(entry)
            return True

        self._update(name, end)
        if not ended:
            return None
        log.info("adapter registry: canary %s/%s ended: %s", name, ended[0].version, outcome)
        return ended[0]

    def _update(self, name: str, change: Callable[[State], bool]) -> None:
        """Apply `change` to the name's state and write it back only if nobody wrote it in
        between (compare-and-swap on its ETag); on a lost race read again and reapply. `change`
        edits the state in place and returns whether to write; it may raise to refuse."""
        key = f"{name}/{STATE}"
        for attempt in range(_UPDATE_ATTEMPTS):
            blob = self.blobs.read(key)
            state = self._parse_state(name, blob.data) if blob is not None else {}
            if not change(state):
                return
            data = json.dumps(state, indent=1, sort_keys=True).encode()
            written = self.blobs.replace(key, data, blob.etag) if blob is not None else self.blobs.create(key, data)
            if written:
                self._states.pop(name, None)
                return
            # Another writer got there first: back off a little, with jitter so two do not collide again.
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise Unavailable(f"adapter {name}: its registry state kept changing under {_UPDATE_ATTEMPTS} writes; retry")


def _copier(src: Path) -> Callable[[str, Path], None]:
    def copy_file(file: str, dest: Path) -> None:
        shutil.copyfile(src / file, dest)

    return copy_file


def _channel_of(state: State, channel: str) -> tuple[str, float] | None:
    channels = state.get("channels")
    return parse_channel(channels.get(channel)) if isinstance(channels, dict) else None


def _channel_version(state: State, channel: str) -> str | None:
    info = _channel_of(state, channel)
    return info[0] if info else None


def _canary_of(name: str, state: State) -> CanaryEntry | None:
    data = state.get("canary")
    return None if data is None else parse_canary(data, f"of {name}")


def _move(state: State, channel: str, version: str) -> bool:
    previous = _channel_version(state, channel)
    if previous == version:
        return False
    now = time.time()
    state.setdefault("channels", {})[channel] = {"version": version, "updated_at": now}
    state.setdefault("history", {}).setdefault(channel, []).append(
        {"version": version, "previous": previous, "updated_at": now}
    )
    return True
