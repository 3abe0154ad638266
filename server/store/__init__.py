"""The completion log and feedback store. `open_store(url)` picks the implementation by URL scheme."""

from __future__ import annotations

from .base import CanaryEvidence, CompletionRef, FeedbackTx, Lease, Store, StoredEventKey, VersionFeedback
from .migrations import SchemaTooNew
from .schema import prompt_sha256

SUPPORTED_SCHEMES = ("sqlite:///", "postgresql+psycopg://")


def open_store(url: str) -> Store:
    """Opens (creating and migrating as needed) the store at `url`.

    Supported: "sqlite:///relative/path.db" and "sqlite:////absolute/path.db" (parent folders are
    created), and "postgresql+psycopg://user:password@host:port/database" (the database must exist;
    its tables are created and migrated). Raises ValueError for any other scheme, SchemaTooNew for
    a database written by a newer tuneloop.
    """
    from .sql import POSTGRES_PREFIX, SQLITE_PREFIX, SqlStore  # noqa: PLC0415 - SQLAlchemy loads only when a store opens

    if url.startswith(SQLITE_PREFIX):
        return SqlStore.open(url)
    if url.startswith(POSTGRES_PREFIX):
        return SqlStore.open_postgres(url)
    raise ValueError(
        f"unsupported store URL {url!r}; supported schemes: {', '.join(SUPPORTED_SCHEMES)} "
        "(e.g. sqlite:////var/lib/tuneloop/tuneloop.db)"
    )


__all__ = [
    "CanaryEvidence",
    "CompletionRef",
    "FeedbackTx",
    "Lease",
    "SchemaTooNew",
    "Store",
    "StoredEventKey",
    "VersionFeedback",
    "open_store",
    "prompt_sha256",
]
