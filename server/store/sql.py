"""The store on SQLAlchemy Core: SQLite in WAL mode (embedded) or PostgreSQL through psycopg 3.

Durability: `synchronous=FULL` on every connection. In WAL mode NORMAL already survives a killed
process, but a power loss or kernel crash can lose the last commits; FULL fsyncs the WAL at each
commit, and group commit amortises that fsync over whole batches, so acknowledged feedback and
logged completions are on disk.

Concurrency: the completion log and the feedback writer are separate threads with separate
connections. Write transactions start with BEGIN IMMEDIATE (they take the write lock up front and
wait for it up to the busy timeout); a deferred transaction that reads first and then writes can
fail at once with SQLITE_BUSY when another writer committed in between. Readers use plain BEGIN
and, thanks to WAL, never block or are blocked by the writers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Row,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from ..domain import CompletionRecord
from ..feedback.events import FeedbackEvent, FeedbackRecord
from . import live_feedback
from .base import CanaryEvidence, CompletionRef, StoredEventKey, VersionFeedback
from .migrations import migrate
from .schema import completions, feedback, prompt_sha256

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIX = "postgresql+psycopg://"


def sqlite_engine(url: str, busy_timeout_s: float = 10.0) -> Engine:
    """An engine on a SQLite file with WAL, FULL sync, foreign keys and explicit BEGINs.

    `busy_timeout_s`: how long a write waits for another writer's lock before failing (the
    writers then retry the whole batch with backoff).
    """
    path = url[len(SQLITE_PREFIX) :]
    if not path or path == ":memory:" or "mode=memory" in path:
        raise ValueError(
            f"{url!r}: in-memory SQLite is not supported (the writer threads need one shared file); "
            "use sqlite:///path/to/file.db"
        )
    Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver must not issue its own BEGINs; we do below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class SqlStore:
    """`Store` on a SQLAlchemy engine. Thread-safe: each call checks out its own connection."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        with self._write() as conn:
            migrate(conn)

    @classmethod
    def open(cls, url: str, busy_timeout_s: float = 10.0) -> SqlStore:
        return cls(sqlite_engine(url, busy_timeout_s))

    @classmethod
    def open_postgres(cls, url: str) -> SqlStore:
        """The store on PostgreSQL through psycopg 3. Writes run at READ COMMITTED: the unique
        indexes (event id, current judgement) reject a concurrent duplicate, and the writers retry."""
        # pre_ping: a pooled connection dropped by a server restart is replaced instead of failing a call.
        return cls(create_engine(url, pool_pre_ping=True))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    # --- completions ---

    def write_completions(self, records: Sequence[CompletionRecord]) -> None:
        if not records:
            return
        with self._write() as conn:
            stmt = _insert_if_absent(conn, completions, "completion_id")
            conn.execute(stmt, [_completion_row(r) for r in records])

    def get_completion(self, completion_id: str) -> CompletionRecord | None:
        return self.get_completions([completion_id]).get(completion_id)

    def get_completions(self, completion_ids: Collection[str]) -> dict[str, CompletionRecord]:
        if not completion_ids:
            return {}
        cols = [c for c in completions.c if c.name != "prompt_sha256"]
        with self._read() as conn:
            rows = conn.execute(select(*cols).where(completions.c.completion_id.in_(list(completion_ids))))
            return {row.completion_id: CompletionRecord(**row._mapping) for row in rows}

    def count_completions(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(completions)).scalar_one()

    # --- feedback ---

    @contextmanager
    def feedback_transaction(self) -> Iterator[SqlFeedbackTx]:
        with self._write() as conn:
            yield SqlFeedbackTx(conn)

    def feedback_since(self, cursor: tuple[int, int] = (0, 0), limit: int = 1000) -> list[FeedbackRecord]:
        c = feedback.c
        query = select(feedback).where(tuple_(c.txid, c.seq) > tuple_(*cursor))
        if self._engine.dialect.name == "postgresql":
            # Only rows of transactions older than every one still running: those can no longer
            # change, and no row can commit later with a smaller (txid, seq) than what is read, so
            # the cursor never passes a row. A row waits at most as long as the oldest open write.
            query = query.where(c.txid < text("pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
        query = query.order_by(c.txid, c.seq).limit(limit)
        with self._read() as conn:
            return [_feedback_record(r) for r in conn.execute(query)]

    def iter_feedback(self, page_size: int = 1000) -> Iterator[FeedbackRecord]:
        cursor = (0, 0)
        while page := self.feedback_since(cursor, page_size):
            yield from page
            cursor = page[-1].cursor

    def feedback_for_prompt(self, prompt_sha256: str) -> list[FeedbackRecord]:
        query = select(feedback).where(feedback.c.prompt_sha256 == prompt_sha256).order_by(feedback.c.seq)
        with self._read() as conn:
            return [_feedback_record(r) for r in conn.execute(query)]

    def get_feedback(self, event_id: str) -> FeedbackRecord | None:
        with self._read() as conn:
            row = conn.execute(select(feedback).where(feedback.c.event_id == event_id)).first()
        return _feedback_record(row) if row is not None else None

    def count_feedback(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(feedback)).scalar_one()

    def version_feedback(self, adapter_name: str) -> dict[str, VersionFeedback]:
        with self._read() as conn:
            return live_feedback.version_feedback(conn, adapter_name)

    def canary_evidence(
        self, adapter_name: str, canary_version: str, stable_version: str, since: float
    ) -> CanaryEvidence:
        with self._read() as conn:
            return live_feedback.canary_evidence(conn, adapter_name, canary_version, stable_version, since)

    def close(self) -> None:
        self._engine.dispose()


class SqlFeedbackTx:
    """`FeedbackTx` on one connection inside an open write transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def completion_refs(self, completion_ids: Collection[str]) -> dict[str, CompletionRef]:
        if not completion_ids:
            return {}
        query = select(*_REF_COLS).where(completions.c.completion_id.in_(list(completion_ids)))
        return {r.completion_id: CompletionRef(**r._mapping) for r in self._conn.execute(query)}

    def group_refs(self, group_ids: Collection[str]) -> dict[str, list[CompletionRef]]:
        wanted = [g for g in group_ids if g]  # "" is the group of every n=1 completion, never a real group
        if not wanted:
            return {}
        query = (
            select(*_REF_COLS)
            .where(completions.c.group_id.in_(wanted))
            .order_by(completions.c.group_id, completions.c.candidate_index)
        )
        groups: dict[str, list[CompletionRef]] = {}
        for r in self._conn.execute(query):
            groups.setdefault(r.group_id, []).append(CompletionRef(**r._mapping))
        return groups

    def stored_events(self, event_ids: Collection[str]) -> dict[str, StoredEventKey]:
        if not event_ids:
            return {}
        c = feedback.c
        query = select(c.event_id, c.content_sha256, c.seq, c.supersedes).where(c.event_id.in_(list(event_ids)))
        return {r.event_id: StoredEventKey(**r._mapping) for r in self._conn.execute(query)}

    def current_judgements(self, judgement_keys: Collection[str]) -> dict[str, str]:
        if not judgement_keys:
            return {}
        c = feedback.c
        query = select(c.judgement_key, c.event_id).where(
            c.judgement_key.in_(list(judgement_keys)), c.superseded_by.is_(None)
        )
        return {r.judgement_key: r.event_id for r in self._conn.execute(query)}

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[int]:
        if not records:
            return []
        # A plain executemany, then one SELECT for the sequence numbers: SQLite cannot return
        # them in parameter order from a multi-row INSERT, and one INSERT per row costs far more.
        self._conn.execute(feedback.insert(), [_feedback_row(r) for r in records])
        ids = [r.event.event_id for r in records]
        query = select(feedback.c.event_id, feedback.c.seq).where(feedback.c.event_id.in_(ids))
        seq_of = {r.event_id: r.seq for r in self._conn.execute(query)}
        return [seq_of[i] for i in ids]

    def mark_superseded(self, links: Sequence[tuple[str, str]]) -> None:
        if not links:
            return
        stmt = update(feedback).where(feedback.c.event_id == bindparam("old")).values(superseded_by=bindparam("new"))
        self._conn.execute(stmt, [{"old": old, "new": new} for old, new in links])


def _insert_if_absent(conn: Connection, table: Table, key: str) -> Insert:
    """INSERT ... ON CONFLICT (key) DO NOTHING in the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])


_REF_COLS = (
    completions.c.completion_id,
    completions.c.group_id,
    completions.c.candidate_index,
    completions.c.prompt_sha256,
    completions.c.adapter_name,
    completions.c.adapter_version,
)


def _completion_row(r: CompletionRecord) -> dict[str, Any]:
    row = {c.name: getattr(r, c.name) for c in completions.c if c.name != "prompt_sha256"}
    row["prompt_sha256"] = prompt_sha256(r.prompt_text)
    return row


def _feedback_row(r: FeedbackRecord) -> dict[str, Any]:
    e = r.event
    return {
        "event_id": e.event_id,
        "content_sha256": e.content_sha256,
        "rater_id": e.rater_id,
        "kind": e.kind,
        "completion_id": r.completion_id,
        "second_completion_id": r.second_completion_id,
        "group_id": e.group_id,
        "prompt_sha256": r.prompt_sha256,
        "thumb_up": None if e.thumb_up is None else int(e.thumb_up),
        "rating": e.rating,
        "choice": e.choice,
        "corrected_text": e.corrected_text,
        "comment_text": e.comment_text,
        "reason_tags": list(e.reason_tags),
        "created_at": r.created_at,
        "supersedes": r.supersedes,
        "superseded_by": r.superseded_by,
        "judgement_key": e.judgement_key,
    }


def _feedback_record(row: Row[Any]) -> FeedbackRecord:
    by_ids = row.kind != "pairwise" or not row.group_id  # the event named its completions by id
    event = FeedbackEvent(
        event_id=row.event_id,
        rater_id=row.rater_id,
        kind=row.kind,
        completion_id=row.completion_id if by_ids else "",
        second_completion_id=(row.second_completion_id or "") if by_ids else "",
        group_id=row.group_id,
        thumb_up=None if row.thumb_up is None else bool(row.thumb_up),
        rating=row.rating,
        choice=row.choice,
        corrected_text=row.corrected_text,
        comment_text=row.comment_text,
        reason_tags=tuple(row.reason_tags),
    )
    return FeedbackRecord(
        seq=row.seq,
        event=event,
        completion_id=row.completion_id,
        second_completion_id=row.second_completion_id,
        prompt_sha256=row.prompt_sha256,
        created_at=row.created_at,
        supersedes=row.supersedes,
        superseded_by=row.superseded_by,
        txid=row.txid,
    )
