"""The tables as the queries see them (the latest schema version).

`migrations.py` creates and changes these tables version by version with its own frozen DDL, so a
migration never changes meaning when this file moves on; `tests/test_store.py` checks that a freshly
migrated database has exactly the columns declared here.

Types are portable SQLAlchemy Core types: the same statements run on SQLite today and PostgreSQL
later (JSON becomes JSONB there, the feedback sequence a BIGINT identity).
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Double, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

from tuneloop.server.domain import prompt_sha256  # noqa: F401 - re-exported: the store's key

metadata = MetaData()

# SQL NULL for None (not the JSON literal 'null'), so "IS NULL" filters work.
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid; BIGINT would not autoincrement there.
Sequence64 = BigInteger().with_variant(Integer(), "sqlite")


completions = Table(
    "completions",
    metadata,
    Column("completion_id", String(64), primary_key=True),
    Column("group_id", String(64), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("candidate_index", Integer, nullable=False),
    Column("request", Json, nullable=False),
    Column("prompt_text", Text, nullable=False),
    Column("prompt_sha256", String(64), nullable=False),
    Column("prompt_token_count", Integer, nullable=False),
    Column("output_text", Text, nullable=False),
    Column("output_token_ids", Json, nullable=False),
    Column("output_logprobs", Json, nullable=True),
    Column("finish_reason", String(16), nullable=False),
    Column("sampling", Json, nullable=False),
    Column("adapter_name", String(128), nullable=False),
    Column("adapter_version", String(128), nullable=False),
    Column("user_id", String(256), nullable=False),
    Column("session_id", String(256), nullable=False),
    Column("tags", Json, nullable=False),
    Column("queue_s", Double, nullable=False),
    Column("time_to_first_token_s", Double, nullable=False),
    Column("total_s", Double, nullable=False),
    Column("created_at", Double, nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    # Strictly increasing, never reused: the trainer's "everything new since cursor C".
    Column("seq", Sequence64, primary_key=True, autoincrement=True),
    Column("event_id", String(128), nullable=False, unique=True),
    Column("content_sha256", String(64), nullable=False),
    Column("rater_id", String(256), nullable=False),
    Column("kind", String(16), nullable=False),
    # The judged completion; for pairwise the first one (resolved from the group when sent by group).
    Column("completion_id", String(64), nullable=False),
    Column("second_completion_id", String(64), nullable=True),
    Column("group_id", String(64), nullable=False),  # as sent ("" when sent by ids)
    Column("prompt_sha256", String(64), nullable=False),
    Column("thumb_up", Integer, nullable=True),  # 1 up, 0 down
    Column("rating", Integer, nullable=True),
    Column("choice", String(8), nullable=True),  # first | second | tie
    Column("corrected_text", Text, nullable=True),
    Column("comment_text", Text, nullable=False),
    Column("reason_tags", Json, nullable=False),
    Column("created_at", Double, nullable=False),
    # Supersede links for thumbs and ratings (same rater, same completion, same kind): the newer
    # row names the older one at insert; the older row is updated to name the newer one.
    Column("supersedes", String(128), nullable=True),
    Column("superseded_by", String(128), nullable=True),
    # Set for thumbs and ratings only: `judgement_key(kind, rater, completion)`; unique among rows
    # not superseded, so the current judgement is one index probe away.
    Column("judgement_key", String(512), nullable=True),
    # The writing transaction (PostgreSQL's pg_current_xact_id(), set by the database; 0 on
    # SQLite): with `seq`, the order in which incremental readers see rows (migration 3).
    Column("txid", BigInteger, nullable=False, server_default="0"),
    sqlite_autoincrement=True,
)

# One row per named lease (migration 4). Times are the database's clock (unix seconds), so
# replicas on hosts whose clocks disagree still agree on when a lease expires.
leases = Table(
    "leases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", String(256), nullable=False),  # the replica holding it now, or that held it last
    # Fencing token: grows by one each time the lease is taken anew (another holder, or the same
    # one after it lapsed), never on a renewal; an act checks it is still the current one.
    Column("token", BigInteger, nullable=False),
    Column("expires_at", Double, nullable=False),  # 0 once released
    Column("acquired_at", Double, nullable=False),  # when this holder's term began
    Column("renewed_at", Double, nullable=False),
)
