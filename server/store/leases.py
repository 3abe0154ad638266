"""Named leases in the store's database (SQLAlchemy Core), for roles only one replica may play.

Every statement reads the time from the database, never from the caller: replicas whose host
clocks disagree still agree on when a lease expires. Taking or renewing is one
`INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE` statement. On PostgreSQL the conflicting row is
locked and the WHERE is evaluated on its latest committed version (even at READ COMMITTED), so of
two racing contenders the second sees the first's new holder and expiry and gets no row back; on
SQLite the write transaction holds the database's write lock (BEGIN IMMEDIATE) for the statement.

Why a table and not PostgreSQL's `pg_try_advisory_lock`: the table works the same on both
backends, operators can read it (`SELECT * FROM leases`), and its token fences acts. An advisory
lock belongs to a session: it needs a dedicated connection held for the whole term (no pooler in
transaction mode), outlives a partitioned holder until TCP keepalive notices, and has no token.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Connection, Double, and_, case, cast, literal, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from .base import Lease
from .schema import leases

RELEASED = 0.0  # expires_at of a released lease: expired for every clock


def _db_now(conn: Connection) -> ColumnElement[float]:
    """The database's clock in unix seconds, fixed for the whole statement."""
    if conn.dialect.name == "postgresql":
        # statement_timestamp(): when the statement began, before it waited on a row lock. A new
        # expiry counted from it is never later than the caller's own (sent before) + ttl.
        return cast(text("EXTRACT(EPOCH FROM statement_timestamp())"), Double)
    # SQLite fixes 'now' for one statement step; julianday keeps the milliseconds.
    return text("((julianday('now') - 2440587.5) * 86400.0)")  # type: ignore[return-value]


def acquire(conn: Connection, name: str, holder: str, ttl_s: float) -> Lease | None:
    if not ttl_s > 0:
        raise ValueError(f"a lease's ttl must be > 0 seconds, got {ttl_s}")
    now = _db_now(conn)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    new = dialect.insert(leases).values(
        name=name, holder=holder, token=1, expires_at=now + literal(ttl_s), acquired_at=now, renewed_at=now
    )
    row, mine = leases.c, new.excluded
    # The same holder's unexpired term goes on (same token); anything else starts a new term.
    renewal = and_(row.holder == mine.holder, row.expires_at >= mine.renewed_at)
    stmt = new.on_conflict_do_update(
        index_elements=[row.name],
        set_={
            "holder": mine.holder,
            "token": case((renewal, row.token), else_=row.token + 1),
            "expires_at": mine.expires_at,
            "acquired_at": case((renewal, row.acquired_at), else_=mine.acquired_at),
            "renewed_at": mine.renewed_at,
        },
        where=or_(row.holder == mine.holder, row.expires_at < mine.renewed_at),
    ).returning(row.token, row.expires_at, row.acquired_at)
    got = conn.execute(stmt).first()
    return None if got is None else Lease(name, holder, got.token, got.expires_at, got.acquired_at)


def _is(lease: Lease) -> ColumnElement[bool]:
    return and_(leases.c.name == lease.name, leases.c.holder == lease.holder, leases.c.token == lease.token)


def is_current(conn: Connection, lease: Lease) -> bool:
    query = select(leases.c.token).where(_is(lease), leases.c.expires_at > _db_now(conn))
    return conn.execute(query).first() is not None


def release(conn: Connection, lease: Lease) -> bool:
    stmt = update(leases).where(_is(lease), leases.c.expires_at > _db_now(conn)).values(expires_at=RELEASED)
    return conn.execute(stmt).rowcount == 1


def get(conn: Connection, name: str) -> Lease | None:
    row = conn.execute(select(leases).where(leases.c.name == name)).first()
    return None if row is None else Lease(row.name, row.holder, row.token, row.expires_at, row.acquired_at)
