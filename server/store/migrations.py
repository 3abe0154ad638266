"""Versioned schema: an ordered list of migrations and a `schema_version` table.

Each migration carries its own frozen DDL (tables built on a private MetaData), so it means the
same thing forever, whatever `schema.py` says later; a schema change is a new migration appended
here plus the matching edit of `schema.py`. Opening a store applies the pending migrations in one
transaction, and refuses a database written by a newer tuneloop instead of guessing at it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer tuneloop than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _json() -> JSON:
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def _v1_completions(conn: Connection) -> None:
    md = MetaData()
    Table(
        "completions",
        md,
        Column("completion_id", String(64), primary_key=True),
        Column("group_id", String(64), nullable=False),
        Column("request_id", String(64), nullable=False),
        Column("candidate_index", Integer, nullable=False),
        Column("request", _json(), nullable=False),
        Column("prompt_text", Text, nullable=False),
        Column("prompt_sha256", String(64), nullable=False),
        Column("prompt_token_count", Integer, nullable=False),
        Column("output_text", Text, nullable=False),
        Column("output_token_ids", _json(), nullable=False),
        Column("output_logprobs", _json(), nullable=True),
        Column("finish_reason", String(16), nullable=False),
        Column("sampling", _json(), nullable=False),
        Column("adapter_name", String(128), nullable=False),
        Column("adapter_version", String(128), nullable=False),
        Column("user_id", String(256), nullable=False),
        Column("session_id", String(256), nullable=False),
        Column("tags", _json(), nullable=False),
        Column("queue_s", Double, nullable=False),
        Column("time_to_first_token_s", Double, nullable=False),
        Column("total_s", Double, nullable=False),
        Column("created_at", Double, nullable=False),
        Index("ix_completions_group_id", "group_id"),
        Index("ix_completions_created_at", "created_at"),
        Index("ix_completions_adapter", "adapter_name", "adapter_version"),
        Index("ix_completions_prompt_sha256", "prompt_sha256"),
    )
    md.create_all(conn)


def _v2_feedback(conn: Connection) -> None:
    md = MetaData()
    Table("completions", md, Column("completion_id", String(64), primary_key=True))  # FK target only
    Table(
        "feedback",
        md,
        Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(128), nullable=False, unique=True),
        Column("content_sha256", String(64), nullable=False),
        Column("rater_id", String(256), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("completion_id", String(64), ForeignKey("completions.completion_id"), nullable=False),
        Column("second_completion_id", String(64), ForeignKey("completions.completion_id"), nullable=True),
        Column("group_id", String(64), nullable=False),
        Column("prompt_sha256", String(64), nullable=False),
        Column("thumb_up", Integer, nullable=True),
        Column("rating", Integer, nullable=True),
        Column("choice", String(8), nullable=True),
        Column("corrected_text", Text, nullable=True),
        Column("comment_text", Text, nullable=False),
        Column("reason_tags", _json(), nullable=False),
        Column("created_at", Double, nullable=False),
        Column("supersedes", String(128), nullable=True),
        Column("superseded_by", String(128), nullable=True),
        Column("judgement_key", String(512), nullable=True),
        # "All feedback on prompt P" (the trainer pairs thumbs of one prompt).
        Index("ix_feedback_prompt_sha256", "prompt_sha256", "seq"),
        # At most one current thumbs and one current rating per rater and completion, enforced by
        # the database even against a concurrent writer; also the supersede lookup.
        Index(
            "ux_feedback_current_judgement",
            "judgement_key",
            unique=True,
            sqlite_where=text("superseded_by IS NULL"),
            postgresql_where=text("superseded_by IS NULL"),
        ),
        sqlite_autoincrement=True,
    )
    md.create_all(conn, tables=[md.tables["feedback"]])


def _v3_feedback_txid(conn: Connection) -> None:
    """The writing transaction's id on every feedback row (PostgreSQL; 0 on SQLite, whose writers
    are serialised so `seq` order is commit order there). With concurrent writers a row can commit
    after a row with a higher `seq`; an incremental reader orders by (txid, seq) and reads only rows
    of transactions older than its snapshot's xmin, so it can never skip one (see `feedback_since`).
    Rows written before this migration get 0: they are all committed."""
    conn.execute(text("ALTER TABLE feedback ADD COLUMN txid BIGINT NOT NULL DEFAULT 0"))
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE feedback ALTER COLUMN txid SET DEFAULT (pg_current_xact_id()::text::bigint)"))
    conn.execute(text("CREATE INDEX ix_feedback_txid_seq ON feedback (txid, seq)"))


def _v4_leases(conn: Connection) -> None:
    """Named leases: which replica holds a role that only one may play at a time (the canary
    decider). The row outlives its holders, so its fencing token only ever grows."""
    md = MetaData()
    Table(
        "leases",
        md,
        Column("name", String(128), primary_key=True),
        Column("holder", String(256), nullable=False),
        Column("token", BigInteger, nullable=False),
        Column("expires_at", Double, nullable=False),
        Column("acquired_at", Double, nullable=False),
        Column("renewed_at", Double, nullable=False),
    )
    md.create_all(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "completion log", _v1_completions),
    Migration(2, "feedback events", _v2_feedback),
    Migration(3, "feedback commit order for incremental readers", _v3_feedback_txid),
    Migration(4, "leases for single-replica roles", _v4_leases),
)
LATEST_VERSION = MIGRATIONS[-1].version

_md = MetaData()
schema_version = Table(
    "schema_version",
    _md,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", Double, nullable=False),
)


def current_version(conn: Connection) -> int:
    """The highest applied migration, 0 for an empty database."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one()


def migrate(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Applies the pending migrations inside the caller's transaction; returns the versions applied.

    Raises SchemaTooNew when the database is ahead of `migrations`: its tables may hold columns
    or meanings this code does not know, and writing to them could corrupt data.
    """
    _md.create_all(conn)
    have = current_version(conn)
    latest = migrations[-1].version
    if have > latest:
        raise SchemaTooNew(
            f"the database is at schema version {have} but this tuneloop knows versions up to {latest}; "
            "upgrade tuneloop (or point it at another store)"
        )
    applied = []
    for m in migrations:
        if m.version > have:
            m.apply(conn)
            conn.execute(
                insert(schema_version).values(version=m.version, description=m.description, applied_at=time.time())
            )
            applied.append(m.version)
    return applied
