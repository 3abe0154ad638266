"""The adapter registry: versioned LoRA adapters with named channels and a canary, that the
trainer publishes to and every serving replica follows.

Two implementations of one `Registry` protocol (`base.py`): a local directory (`local.py`), and an
object store shared by several hosts (`objectstore.py`, S3 through fsspec). `open_registry` picks
one from the `registry_url` setting.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    ACCEPTED,
    ADAPTER_FILES,
    CANARY_CHANNEL,
    DEFAULT_CHANNEL,
    KINDS,
    MANIFEST,
    POLICY,
    REJECTED,
    REPORT_FILES,
    RESERVED_NAMES,
    REWARD,
    AdapterVersion,
    CanaryEntry,
    CorruptEntry,
    Registry,
    RegistryReader,
    RegistryUnavailable,
    RegistryWriter,
    base_model_fingerprint,
    default_registry_dir,
    validate_name,
    version_number,
)
from .local import AdapterRegistry

__all__ = [
    "ACCEPTED",
    "ADAPTER_FILES",
    "CANARY_CHANNEL",
    "DEFAULT_CHANNEL",
    "KINDS",
    "MANIFEST",
    "POLICY",
    "REJECTED",
    "REPORT_FILES",
    "RESERVED_NAMES",
    "REWARD",
    "AdapterRegistry",
    "AdapterVersion",
    "CanaryEntry",
    "CorruptEntry",
    "Registry",
    "RegistryReader",
    "RegistryUnavailable",
    "RegistryWriter",
    "base_model_fingerprint",
    "default_registry_dir",
    "open_registry",
    "validate_name",
    "version_number",
]


def open_registry(url: str, directory: str | Path = "") -> Registry:
    """The registry a `registry_url` setting names.

    Empty `url`: the local directory `directory` (default `$TUNELOOP_HOME/adapters`). Otherwise an
    fsspec URL such as `s3://bucket/prefix`, shared by every replica and trainer that names it;
    `directory` is then where this host keeps the versions it fetched (vLLM loads adapters from
    local files). Raises `RegistryUnavailable`, naming the setting, when the store cannot be used.
    """
    if not url:
        return AdapterRegistry(directory)
    from .objectstore import ObjectStoreRegistry  # noqa: PLC0415 - fsspec loads only when a URL is set

    return ObjectStoreRegistry.open(url, Path(directory) if str(directory) else default_registry_dir())
