"""Engines, sessions and migrations. SQLite (WAL, write lock taken up front) or PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import select
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Executable, Result, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError, SQLAlchemyError
from sqlmodel import Session

from fleet.errors import (
    ConfigError,
    PermissionDeniedError,
    UnavailableError,
    first_line,
    missing_database,
    refused_credentials,
)

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# A pooled PostgreSQL connection idle this long is pinged at checkout (see _replace_if_closed_by_server).
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "fleet_idle_since"  # in the pool's per-connection info (cleared when it reconnects)
# Any 64-bit number unique to Fleet: the PostgreSQL advisory lock that serialises `fleet db upgrade`.
_M = TypeVar("_M")
_MIGRATION_LOCK_ID = 0x466C656574_01


def make_engine(url: str, timeout_s: float = 10.0) -> Engine:
    """Build an engine; call it after any fork (worker_process_init), never at import. `timeout_s` bounds
    a wait on SQLite's write lock, a PostgreSQL connect and an unacknowledged write to PostgreSQL."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy raises several types for a bad URL
        raise ConfigError("FLEET_DATABASE_URL is not a valid database URL") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, timeout_s)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        # A client frozen or cut off inside a transaction must not hold row locks for ever: the server
        # ends such a session after 20 s. TCP keepalives and a user timeout notice a silent server.
        engine = create_engine(url, pool_size=5, max_overflow=5,
                               connect_args={"connect_timeout": max(1, round(min(timeout_s, 5))), "keepalives": 1,
                                             "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                                             "tcp_user_timeout": round(timeout_s * 1000),
                                             "options": "-c idle_in_transaction_session_timeout=20000"})
        event.listen(engine, "checkout", functools.partial(_replace_if_closed_by_server, engine.dialect))
        event.listen(engine, "checkin", _mark_idle)
        return engine
    raise ConfigError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://")


def _replace_if_closed_by_server(dialect: Dialect, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Hand out a pooled PostgreSQL connection only if the server has not ended it, without a round trip on
    the hot path.

    A restart, a failover behind a proxy or pg_terminate_backend ends a session with a last message and a
    close, even a moment after the connection's last use; callers that write once (an orphaned attempt's
    spend, a beat tick) must never get such a connection (tests/test_db.py). An idle connection has nothing
    to read unless that happened (or the kernel's keepalives found the peer gone), so a look at its socket
    tells, where pool_pre_ping spent a round trip on every checkout (3 per run). Something harmless to read
    (a notice) is told apart by the dialect's ping. A server host lost without a word (a crash, an address
    moved to another host) sends nothing, so a connection idle PING_AFTER_IDLE_S or longer is pinged
    anyway: the write-once callers find theirs idle that long. One used less than that before such a loss
    fails its caller's next statement, as a statement in flight at the loss fails, and the pool drops the
    rest. A connection just made is not checked again. DisconnectionError makes the pool connect afresh.
    """
    idle_since = record.info.get(_IDLE_SINCE)
    if idle_since is None:
        return
    pinged = time.monotonic() - idle_since >= PING_AFTER_IDLE_S or _idle_with_input(dbapi_connection)
    if pinged and not _answers_ping(dialect, dbapi_connection):
        raise DisconnectionError("the server closed this pooled connection")


def _mark_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _idle_with_input(dbapi_connection: Any) -> bool:
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # noqa: BLE001 - psycopg raises OperationalError once the connection is closed
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _answers_ping(dialect: Dialect, dbapi_connection: Any) -> bool:
    try:
        return bool(dialect.do_ping(dbapi_connection))
    except Exception:  # noqa: BLE001 - any failure of a ping means a connection not to hand out
        return False


def missing_sqlite_file(url: str) -> Path | None:
    """The file a plain-file SQLite URL names, made absolute, when it does not exist: connecting would create it
    empty (a command that only looks, run in the wrong folder, would leave one behind). None otherwise."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - a bad URL is make_engine's to report
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).absolute()
    return None if path.exists() else path


def _sqlite_engine(url: str, timeout_s: float) -> Engine:
    # isolation_level=None hands transaction control to us, so every transaction can start with
    # BEGIN IMMEDIATE: the write lock is taken before the first read, which makes read-then-write
    # (a reservation against a cap) race-free across processes and makes a busy writer wait
    # out busy_timeout instead of failing at once with SQLITE_BUSY.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s,
                                              "isolation_level": None})

    @event.listens_for(engine, "do_connect")
    def _make_folder(*_args: Any) -> None:
        # SQLite creates a missing file but not a missing folder ("unable to open database file").
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            _make_private(Path(database))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # money lives here: survive power loss too
        cursor.execute(f"PRAGMA busy_timeout={round(timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _make_private(database: Path) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would make it 0666 less the umask:
    0644), and take group and other access from one that exists, and from its -wal and -shm.

    It holds every run's payload, log chunks and dead-letter output, and agents under run_as must pass
    its folder (agent-homes/ sits beside it): the folder stays as it is, only the files become private.
    SQLite creates -wal and -shm with the database file's mode, so new ones are 0600 too. An existing
    file is never opened here, only stat()ed and chmod()ed by path: closing any descriptor of a file
    drops every POSIX lock this process holds on it, the locks SQLite's other connections rely on
    (SQLITE_PROTOCOL, or worse, while another connection writes)."""
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # new: nobody holds locks on it
    except FileExistsError:
        pass
    except OSError:
        return  # a folder, a read-only place...: SQLite's own connect says why, as it did before
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        # A file of another user's (a shared database) is theirs to protect: EPERM must not stop a connect.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            mode = path.stat().st_mode & 0o7777
            if mode & 0o077:
                path.chmod(mode & ~0o077)


def session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit, and after it closes.

    Closing it (the end of its `with` block) ends the transaction, and with it SQLite's write lock,
    without expiring anything. Never end a read-only session with `rollback()`: that expires every
    loaded object, which then raises DetachedInstanceError once the session is closed (PITFALLS #18).
    """
    return Session(engine, expire_on_commit=False)


@contextlib.contextmanager
def bounded_session(engine: Engine, wait_s: float) -> Iterator[Session]:
    """A session that waits at most `wait_s` for a lock (SQLite's write lock, a PostgreSQL row lock)
    instead of the engine's 30 s, for writes that must not hold up what comes after them."""
    wait_ms = max(1, int(wait_s * 1000))
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.dbapi_connection
        if sqlite:
            # Below SQLAlchemy, so no transaction (and no BEGIN IMMEDIATE) starts for it; the pooled
            # connection gets its usual timeout back before it is returned.
            usual = raw.execute("PRAGMA busy_timeout").fetchone()[0]  # type: ignore[union-attr]
            raw.execute(f"PRAGMA busy_timeout={wait_ms}")  # type: ignore[union-attr]
        try:
            with Session(bind=conn, expire_on_commit=False) as bounded:
                if not sqlite:
                    bounded.execute(text(f"SET LOCAL lock_timeout = {wait_ms}"))
                yield bounded
        finally:
            if sqlite:
                raw.execute(f"PRAGMA busy_timeout={int(usual)}")  # type: ignore[union-attr]


def lock_timed_out(exc: OperationalError) -> bool:
    """Whether a statement gave up waiting for a lock (a bounded_session's bound), not for the server."""
    if getattr(exc.orig, "sqlstate", None) == "55P03":  # PostgreSQL's lock_not_available
        return True
    return "database is locked" in str(exc.orig)  # SQLite's busy timeout


def execute(session: Session, statement: Executable, params: Any = None) -> Result[Any]:
    """Run a Core statement built once (see models.table_of) in the session's transaction. What the
    session still holds unflushed goes first, as it would before an ORM statement: a Core statement
    skips the ORM's autoflush, and must neither miss a pending row nor be overwritten by a stale one."""
    session.flush()
    return session.execute(statement, params)


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE matched: `session.execute` returns a CursorResult for DML, but is typed as Result."""
    return cast(CursorResult[Any], result).rowcount


def check(engine: Engine) -> None:
    """Raise UnavailableError when the database cannot be reached (ConfigError when it was never created,
    PermissionDeniedError when it refuses who connects)."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        detail = first_line(exc)
        if refused_credentials(detail):
            raise PermissionDeniedError(f"the database refused the credentials ({engine.url.render_as_string()}): "
                                        f"{detail}; check the user and password in FLEET_DATABASE_URL") from None
        raise missing_database(detail) or UnavailableError(
            f"database unreachable ({engine.url.render_as_string()}): {detail}") from None


def alembic_config(engine: Engine) -> Config:
    """An Alembic config that runs our migrations on `engine`."""
    # Alembic is imported here, not at the top: it costs ~0.2 s that `fleet kill` and every worker
    # would otherwise pay for a module they use only to migrate.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision` under a lock, so two hosts upgrading at once is safe."""
    from alembic import command

    try:
        with _migration_lock(engine):
            command.upgrade(alembic_config(engine), revision)
    except OperationalError as exc:
        detail = first_line(exc)
        raise missing_database(detail) or UnavailableError(f"database unreachable: {detail}") from None


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    # SQLite lives on one host: an exclusive file lock beside the database serialises upgrades.
    with open(f"{database}.migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


NEVER = datetime(1970, 1, 1, tzinfo=UTC)  # a placeholder row's time: older than anything it stands in for


def locked_row(session: Session, model: type[_M], key: str, **placeholder: Any) -> _M:
    """The row of `model` whose primary key is `key`, locked for this transaction (FOR UPDATE on PostgreSQL;
    SQLite's transaction holds the write lock). A missing one is first inserted from `placeholder` (INSERT ...
    ON CONFLICT DO NOTHING), so two first writers of a key take turns on one row instead of both inserting
    and one failing on the primary key."""
    table = model.__table__  # type: ignore[attr-defined]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    (column,) = table.primary_key.columns
    session.execute(insert(table).values({column.name: key, **placeholder}).on_conflict_do_nothing())
    row = session.get(model, key, with_for_update=True, populate_existing=True)
    if row is None:  # inserted or already there, in this very transaction: it cannot be missing
        raise RuntimeError(f"{table.name} row {key!r} vanished inside its transaction")
    return row
