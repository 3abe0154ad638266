"""The adapter registry's contract: the protocols every registry implements (a local directory,
`local.py`; an object store shared by replicas and trainers, `objectstore.py`), the types they
return, name and version validation, and the constants of the layout both use:

    <root>/<name>/versions/<version>/   adapter_config.json, adapter_model.safetensors, manifest.json
    <name>'s channels (`current`, ...)  each names one accepted version; moves are logged for rollback
    <name>'s canary                     {"version", "share", "started_at", "auto_decide"} while one runs

Versions are immutable and a version name is never reused for other weights: vLLM caches adapters
by name, and a replica that loaded `v3` once must never serve different weights as `v3`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from ..errors import FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Copied with a version when the trainer wrote them (a round's report, e.g. PPO's).
REPORT_FILES = ("report.md", "report.png")
MANIFEST = "manifest.json"
DEFAULT_CHANNEL = "current"
# A version on trial: it takes a share of default traffic until live feedback promotes it to
# `current` or rolls it back. Its own file (not a plain channel): it carries the share, and ends.
CANARY_CHANNEL = "canary"
RESERVED_NAMES = frozenset({"base"})
ACCEPTED, REJECTED = "accepted", "rejected"
# What a version is: a LoRA policy the server serves, or a reward model (a LoRA plus a score
# head) that only the trainer reads. A manifest without a kind is a policy (older versions).
POLICY, REWARD = "policy", "reward"
KINDS = (POLICY, REWARD)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"v([1-9][0-9]*)")


def default_registry_dir() -> Path:
    """`$TUNELOOP_HOME/adapters` (the server's default too)."""
    from ..config import tuneloop_home  # noqa: PLC0415 - config is only needed for this default

    return (tuneloop_home() / "adapters").resolve()


def validate_name(name: str, what: str = "adapter name") -> str:
    """Refuse names that are not `[a-z0-9][a-z0-9_-]{0,63}`; adapter names may not be "base"."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    if what == "adapter name" and name in RESERVED_NAMES:
        raise InvalidArgument(f"{what} {name!r} is reserved for the bare base model; pick another name")
    return name


def version_number(version: str) -> int:
    """`"v12"` -> 12; anything else is refused."""
    m = VERSION_RE.fullmatch(version)
    if not m:
        raise InvalidArgument(f"version {version!r} is invalid: versions look like v1, v2, ...")
    return int(m.group(1))


def base_model_fingerprint(model_dir: str | Path) -> str:
    """An identity for a base model directory that survives being copied to another machine.

    `<dir name>@<16 hex>` over config.json and, per weight file, its name, size and first and last
    MiB. Reading the ends rather than whole files keeps this cheap for multi-GB models while still
    telling apart two checkpoints of the same architecture (their weights differ at both ends).
    """
    d = Path(model_dir)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise InvalidArgument(f"{d} is not a model directory: config.json is missing")
    h = hashlib.sha256(cfg.read_bytes())
    weights = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    chunk = 1 << 20
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(chunk))
            if size > chunk:
                f.seek(max(chunk, size - chunk))
                h.update(f.read(chunk))
    return f"{d.name}@{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class AdapterVersion:
    """One published version: its directory and manifest, as read (and validated) from disk."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        """Either "accepted" (passed its gate, may be served) or "rejected" (kept for its metrics)."""
        return ACCEPTED if self.manifest.get("status", ACCEPTED) == ACCEPTED else REJECTED

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", POLICY))

    @property
    def base_model(self) -> str:
        return str(self.manifest.get("base_model", ""))

    @property
    def parent_version(self) -> str | None:
        parent = self.manifest.get("parent_version")
        return str(parent) if parent else None

    @property
    def number(self) -> int:
        return version_number(self.version)

    @cached_property
    def adapter_config(self) -> dict[str, Any]:
        return read_json(self.path / "adapter_config.json")

    @property
    def rank(self) -> int | None:
        r = self.adapter_config.get("r")
        return int(r) if isinstance(r, int) else None


@dataclass(frozen=True)
class CanaryEntry:
    """A running canary, as every replica reads it from the registry."""

    version: str
    share: float
    started_at: float  # unix seconds; live feedback on completions served since then is its evidence
    auto_decide: bool  # let the sequential test promote or roll it back on its own


class CorruptEntry(Exception):
    """A version directory that cannot be trusted (missing files, unparsable manifest)."""


def read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return data


def check_publish(
    name: str, adapter_dir: Path, manifest: dict[str, Any], channel: str | None
) -> tuple[Path, list[str]]:
    """Refuse a publish that cannot succeed, before anything is written; returns the source
    directory and the files a version copies from it (the adapter's, and a round's report)."""
    validate_name(name)
    if channel is not None:
        validate_name(channel, "channel")
    kind = manifest.get("kind", POLICY)
    if kind not in KINDS:
        raise InvalidArgument(f"manifest kind must be one of {KINDS}, got {kind!r}")
    src = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise InvalidArgument(f"{src} is not a peft adapter directory: missing {', '.join(missing)}")
    return src, [*ADAPTER_FILES, *(r for r in REPORT_FILES if (src / r).is_file())]


def check_settable(channel: str) -> None:
    validate_name(channel, "channel")
    if channel == CANARY_CHANNEL:
        raise InvalidArgument(f"'{CANARY_CHANNEL}' is set with start_canary (it carries a traffic share)")


def check_servable(name: str, target: AdapterVersion) -> None:
    """Only a version its gate accepted may take traffic (a channel or a canary)."""
    if target.status != ACCEPTED:
        raise FailedPrecondition(
            f"adapter {name} version {target.version} was rejected by its gate and cannot be served"
        )


def check_share(share: float) -> None:
    if not 0.0 < share <= 1.0:
        raise InvalidArgument(f"canary share must be in (0, 1], got {share}")


def parse_channel(data: Any) -> tuple[str, float] | None:
    """A channel's stored `{"version", "updated_at"}` as (version, unix seconds), or None."""
    if not isinstance(data, dict):
        return None
    version, updated_at = data.get("version"), data.get("updated_at")
    if isinstance(version, str) and VERSION_RE.fullmatch(version):
        return version, float(updated_at) if isinstance(updated_at, (int, float)) else 0.0
    return None


def parse_canary(data: Any, where: str) -> CanaryEntry | None:
    """A stored canary entry, or None (with a warning naming `where` if it is malformed)."""
    try:
        entry = CanaryEntry(
            str(data["version"]), float(data["share"]), float(data["started_at"]), bool(data["auto_decide"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("adapter registry: canary %s is unreadable: %s", where, exc)
        return None
    if not VERSION_RE.fullmatch(entry.version) or not 0.0 < entry.share <= 1.0:
        log.warning("adapter registry: canary %s names no valid version and share: %s", where, data)
        return None
    return entry


class RegistryUnavailable(Unavailable):
    """The configured registry cannot be opened or reached: an unknown URL scheme, a bucket that
    does not exist or answers no requests, missing credentials. The message names the setting."""


class RegistryReader(Protocol):
    """What a serving replica reads: channels, versions, and each version's files as a local
    directory vLLM can load (`AdapterVersion.path`). Version names are immutable and never
    reused for other weights: vLLM caches adapters by name.

    `get` and `resolve` return a version whose files are at `path`; `versions` lists what the
    manifests say, and a registry that fetches files from elsewhere fetches them only on `get`."""

    def names(self) -> list[str]: ...

    def versions(self, name: str) -> list[AdapterVersion]: ...

    def corrupt_versions(self, name: str) -> list[tuple[str, str]]: ...

    def get(self, name: str, version: str) -> AdapterVersion: ...

    def resolve(self, name: str, version: str = "") -> AdapterVersion: ...

    def channel(self, name: str, channel: str = DEFAULT_CHANNEL) -> str | None: ...

    def channel_info(self, name: str, channel: str = DEFAULT_CHANNEL) -> tuple[str, float] | None: ...

    def history(self, name: str, channel: str = DEFAULT_CHANNEL) -> list[str]: ...

    def canary(self, name: str) -> CanaryEntry | None: ...

    def canary_log(self, name: str) -> list[dict[str, Any]]: ...


class RegistryWriter(Protocol):
    """What the trainer and the admin API write: new versions, channel moves, canary starts and ends."""

    def publish(
        self,
        name: str,
        adapter_dir: Path,
        manifest: dict[str, Any],
        *,
        accepted: bool = True,
        channel: str | None = DEFAULT_CHANNEL,
    ) -> AdapterVersion: ...

    def set_channel(self, name: str, channel: str, version: str) -> None: ...

    def start_canary(self, name: str, version: str, share: float, *, auto_decide: bool = True) -> CanaryEntry: ...

    def end_canary(self, name: str, outcome: str, *, expected: str = "", detail: str = "") -> CanaryEntry | None: ...


class Registry(RegistryReader, RegistryWriter, Protocol):
    """Both sides: what the server (which also ends canaries) and the trainer hold."""
