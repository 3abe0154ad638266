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
from dataclasses import dataclass, fields
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Row,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from ..domain import CompletionRecord
from ..feedback.events import FeedbackEvent, FeedbackRecord, json_dumps_fast
from . import leases, live_feedback
from .base import CanaryEvidence, CompletionRef, Lease, StoredEventKey, VersionFeedback
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

    # --- leases ---

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        with self._write() as conn:
            return leases.acquire(conn, name, holder, ttl_s)

    def lease_is_current(self, lease: Lease) -> bool:
        with self._read() as conn:
            return leases.is_current(conn, lease)

    def release_lease(self, lease: Lease) -> bool:
        with self._write() as conn:
            return leases.release(conn, lease)

    def get_lease(self, name: str) -> Lease | None:
        with self._read() as conn:
            return leases.get(conn, name)

    def close(self) -> None:
        self._engine.dispose()


class SqlFeedbackTx:
    """`FeedbackTx` on one connection inside an open write transaction.

    The feedback writer's hot path, so its statements go to the driver as plain SQL with positional
    parameters (`exec_driver_sql`): SQLAlchemy's per-row parameter processing of compiled
    statements cost more than SQLite's own work on a batch. Driver errors still arrive as
    SQLAlchemy's `DBAPIError` subclasses, which the writer retries on.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sql = _FeedbackSql.for_dialect(conn.dialect.name)
        self._current_seq: dict[str, int] = {}  # event id -> seq of the current judgements read

    def _fetch(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        """All rows as the driver's tuples: SQLAlchemy's Row objects cost more than the query here.

        sqlite3 runs a query step by step as its rows are fetched, so a driver error can surface in
        `fetchall`, past SQLAlchemy: it is wrapped the way SQLAlchemy wraps one from `execute`, so
        the writer retries it like any other store error."""
        values = tuple(params)
        result = self._conn.exec_driver_sql(sql, values)
        dbapi_error = self._conn.dialect.loaded_dbapi.Error
        try:
            return result.cursor.fetchall()
        except dbapi_error as exc:
            raise DBAPIError.instance(sql, values, exc, dbapi_error) from exc
        finally:
            result.close()

    def completion_refs(self, completion_ids: Collection[str]) -> dict[str, CompletionRef]:
        if not completion_ids:
            return {}
        ids = list(completion_ids)
        return {r[0]: CompletionRef(*r) for r in self._fetch(self._sql.select_refs_by_id(len(ids)), ids)}

    def group_refs(self, group_ids: Collection[str]) -> dict[str, list[CompletionRef]]:
        wanted = [g for g in group_ids if g]  # "" is the group of every n=1 completion, never a real group
        if not wanted:
            return {}
        groups: dict[str, list[CompletionRef]] = {}
        for r in self._fetch(self._sql.select_refs_by_group(len(wanted)), wanted):
            groups.setdefault(r[1], []).append(CompletionRef(*r))
        return groups

    def stored_events(self, event_ids: Collection[str]) -> dict[str, StoredEventKey]:
        if not event_ids:
            return {}
        ids = list(event_ids)
        return {r[0]: StoredEventKey(*r) for r in self._fetch(self._sql.select_stored(len(ids)), ids)}

    def current_judgements(self, judgement_keys: Collection[str]) -> dict[str, str]:
        if not judgement_keys:
            return {}
        keys = list(judgement_keys)
        rows = self._fetch(self._sql.select_current(len(keys)), keys)
        # Kept for mark_superseded: these are the rows a batch supersedes, found again by primary key.
        self._current_seq.update((event_id, seq) for _key, event_id, seq in rows)
        return {key: event_id for key, event_id, _seq in rows}

    def insert_feedback(self, records: Sequence[FeedbackRecord]) -> list[int]:
        if not records:
            return []
        # A plain executemany: SQLite cannot return the sequence numbers in parameter order from
        # a multi-row INSERT, and one INSERT per row costs far more.
        self._conn.exec_driver_sql(self._sql.insert, [_feedback_values(r) for r in records])
        ids = [r.event.event_id for r in records]
        return self._consecutive_seqs(ids) or self._seqs(ids)

    def _consecutive_seqs(self, ids: Sequence[str]) -> list[int] | None:
        """The rows' sequence numbers read from the first and the last row alone, or None when
        they are not consecutive. The rows were inserted one after another in this transaction,
        and each insert takes a larger `seq` than any before it (SQLite AUTOINCREMENT, a
        PostgreSQL identity), so n strictly increasing numbers spanning n - 1 are exactly
        first..last: two index probes instead of one per row."""
        ends = tuple(dict.fromkeys((ids[0], ids[-1])))  # one id when one row
        seq_of: dict[str, int] = dict(self._fetch(self._sql.select_seqs(len(ends)), ends))
        first, last = seq_of[ids[0]], seq_of[ids[-1]]
        return list(range(first, last + 1)) if last - first == len(ids) - 1 else None

    def _seqs(self, ids: Sequence[str]) -> list[int]:
        """The rows' sequence numbers, one probe per row (when a concurrent writer's rows interleave)."""
        seq_of: dict[str, int] = dict(self._fetch(self._sql.select_seqs(len(ids)), ids))
        return [seq_of[i] for i in ids]

    def mark_superseded(self, links: Sequence[tuple[str, str]]) -> None:
        if not links:
            return
        seq_of = self._current_seq
        if all(old in seq_of for old, _new in links):  # always, from the writer: it read them as current
            self._conn.exec_driver_sql(self._sql.mark_superseded_by_seq, [(new, seq_of[old]) for old, new in links])
        else:
            self._conn.exec_driver_sql(self._sql.mark_superseded, [(new, old) for old, new in links])


# The columns the writer sets, in the order of `_feedback_values`; `seq` and `txid` come from the database.
_FEEDBACK_INSERT_COLUMNS = (
    "event_id", "content_sha256", "rater_id", "kind", "completion_id", "second_completion_id", "group_id",
    "prompt_sha256", "thumb_up", "rating", "choice", "corrected_text", "comment_text", "reason_tags", "created_at",
    "supersedes", "superseded_by", "judgement_key",
)  # fmt: skip
if set(_FEEDBACK_INSERT_COLUMNS) != {c.name for c in feedback.c} - {"seq", "txid"}:  # schema.py moved on
    raise RuntimeError("sql.py: _FEEDBACK_INSERT_COLUMNS no longer matches the feedback table in schema.py")


@dataclass(frozen=True)
class _FeedbackSql:
    """The feedback writer's SQL in one dialect's parameter style ("?" for sqlite3, "%s" for psycopg)."""

    mark: str  # the driver's positional parameter marker
    json_value: str  # how a JSON parameter (sent as text) is written in a VALUES list

    @staticmethod
    @cache
    def for_dialect(name: str) -> _FeedbackSql:
        if name == "postgresql":
            return _FeedbackSql(mark="%s", json_value="CAST(%s AS JSONB)")
        return _FeedbackSql(mark="?", json_value="?")

    def _in(self, n: int) -> str:
        return "(" + ", ".join([self.mark] * n) + ")"

    @cached_property
    def insert(self) -> str:
        values = ", ".join(self.json_value if c == "reason_tags" else self.mark for c in _FEEDBACK_INSERT_COLUMNS)
        return f"INSERT INTO feedback ({', '.join(_FEEDBACK_INSERT_COLUMNS)}) VALUES ({values})"

    @cached_property
    def mark_superseded(self) -> str:
        return f"UPDATE feedback SET superseded_by = {self.mark} WHERE event_id = {self.mark}"

    @cached_property
    def mark_superseded_by_seq(self) -> str:
        return f"UPDATE feedback SET superseded_by = {self.mark} WHERE seq = {self.mark}"

    def select_refs_by_id(self, n: int) -> str:
        return f"SELECT {_REF_COLUMNS} FROM completions WHERE completion_id IN {self._in(n)}"

    def select_refs_by_group(self, n: int) -> str:
        where = f"WHERE group_id IN {self._in(n)} ORDER BY group_id, candidate_index"
        return f"SELECT {_REF_COLUMNS} FROM completions {where}"

    def select_stored(self, n: int) -> str:
        return f"SELECT {_STORED_COLUMNS} FROM feedback WHERE event_id IN {self._in(n)}"

    def select_current(self, n: int) -> str:
        return (
            "SELECT judgement_key, event_id, seq FROM feedback "
            f"WHERE judgement_key IN {self._in(n)} AND superseded_by IS NULL"
        )

    def select_seqs(self, n: int) -> str:
        return f"SELECT event_id, seq FROM feedback WHERE event_id IN {self._in(n)}"


def _insert_if_absent(conn: Connection, table: Table, key: str) -> Insert:
    """INSERT ... ON CONFLICT (key) DO NOTHING in the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])


# The fields of CompletionRef and StoredEventKey, in their order: a row of these builds one positionally.
_REF_COLUMNS = ", ".join(f.name for f in fields(CompletionRef))
_STORED_COLUMNS = ", ".join(f.name for f in fields(StoredEventKey))


def _completion_row(r: CompletionRecord) -> dict[str, Any]:
    row = {c.name: getattr(r, c.name) for c in completions.c if c.name != "prompt_sha256"}
    row["prompt_sha256"] = prompt_sha256(r.prompt_text)
    return row


_reason_tags_json = json_dumps_fast(ensure_ascii=True)  # json.dumps(tags): what the column always held


def _feedback_values(r: FeedbackRecord) -> tuple[Any, ...]:
    """One row's parameters in `_FEEDBACK_INSERT_COLUMNS` order."""
    e = r.event
    return (
        e.event_id, e.content_sha256, e.rater_id, e.kind, r.completion_id, r.second_completion_id, e.group_id,
        r.prompt_sha256, None if e.thumb_up is None else int(e.thumb_up), e.rating, e.choice, e.corrected_text,
        e.comment_text, _reason_tags_json(e.reason_tags) if e.reason_tags else "[]", r.created_at, r.supersedes,
        r.superseded_by, e.judgement_key,
    )  # fmt: skip


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
