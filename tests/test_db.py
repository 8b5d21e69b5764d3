"""Migrations on real SQLite and PostgreSQL: they build exactly the models' schema, run twice harmlessly,
and two processes upgrading at once both succeed and leave one schema at head."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError
from sqlmodel import SQLModel

import fleet.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from fleet import db
from fleet.errors import ConfigError, UnavailableError
from tests.conftest import drop_pg_database, new_pg_database
from tests.faults.proxy import FaultProxy
from tests.harness import wait_for


def head_revision(engine: Engine) -> str:
    head = ScriptDirectory.from_config(db.alembic_config(engine)).get_current_head()
    assert head is not None
    return head


@pytest.fixture
def bare(database_url: str) -> Iterator[Engine]:
    """An engine on an empty, never migrated database of each kind."""
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, SQLModel.metadata))


def test_migrations_build_the_models_schema_on_an_empty_database(bare: Engine) -> None:
    assert db.current_revision(bare) is None
    assert set(inspect(bare).get_table_names()) == set()
    db.upgrade(bare)
    assert db.current_revision(bare) == head_revision(bare)
    assert set(inspect(bare).get_table_names()) == set(SQLModel.metadata.tables) | {"alembic_version"}
    assert schema_diff(bare) == []


def test_schema_diff_notices_a_missing_index(engine: Engine) -> None:
    """The comparison above is not vacuous: a schema that drifts from the models shows up."""
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_runs_created_at"))
    diff = schema_diff(engine)
    assert [entry[0] for entry in diff] == ["add_index"]  # type: ignore[index]


def test_upgrade_is_idempotent_and_keeps_data(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO kill_switches (scope, engaged, hard, changed_at) "
                          "VALUES ('*', true, false, CURRENT_TIMESTAMP)"))
    db.upgrade(engine)
    db.upgrade(engine)
    assert db.current_revision(engine) == head_revision(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        assert conn.execute(text("SELECT scope FROM kill_switches")).scalars().all() == ["*"]
    assert schema_diff(engine) == []


def test_concurrent_upgrades_from_separate_processes_both_succeed(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_DATABASE_URL=database_url, FLEET_LOG_DIR=str(tmp_path / "logs"),
               FLEET_CONFIG=str(tmp_path / "fleet.toml"))
    procs = [subprocess.Popen([sys.executable, "-m", "fleet", "db", "upgrade"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=120), *proc.communicate()) for proc in procs]
    engine = db.make_engine(database_url)
    try:
        head = head_revision(engine)
        for code, out, err in results:
            assert code == 0, err
            assert f"database at revision {head}" in out
        assert db.current_revision(engine) == head
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def _upgrade_at_the_barrier(url: str, barrier: Barrier) -> None:
    engine = db.make_engine(url)  # after the fork: engines are never shared across one
    try:
        barrier.wait(timeout=60)
        db.upgrade(engine)
    finally:
        engine.dispose()


def test_upgrades_released_at_the_same_instant_serialise_on_the_lock(database_url: str) -> None:
    """Forked after imports and released together by a barrier, four upgrades really do collide."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    procs = [context.Process(target=_upgrade_at_the_barrier, args=(database_url, barrier)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == \
                [head_revision(engine)]
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 10000  # FLEET_DB_TIMEOUT_S
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        engine.dispose()
    raw = sqlite3.connect(path)  # WAL is recorded in the file itself, so any later reader sees it
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()
            if p.name in ("fleet.db", "fleet.db-wal", "fleet.db-shm")}


def test_sqlite_files_are_private_to_the_fleets_user_in_a_folder_agents_pass(tmp_path: Path) -> None:
    """fleet.db holds every run's payload, log chunks and dead-letter output; SQLite creates it (and its
    -wal and -shm, with its mode) 0644 under the usual umask, for any run_as agent to read, since agents
    must pass the folder (agent-homes/ sits beside it). The files are 0600; the folder is left as it is."""
    project = tmp_path / "proj"
    project.mkdir()
    project.chmod(0o755)
    previous = os.umask(0o022)
    try:
        engine = db.make_engine(f"sqlite:///{project / 'fleet.db'}")
        db.upgrade(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO run_log_chunks (run_id, attempt, \"offset\", at, data) "
                                 "VALUES ('r1', 1, 0, '2026-01-01', X'00')")
        with engine.connect():  # a live worker holds a connection: -wal and -shm exist
            assert _modes(project) == {"fleet.db": 0o600, "fleet.db-wal": 0o600, "fleet.db-shm": 0o600}
        engine.dispose()
    finally:
        os.umask(previous)
    assert project.stat().st_mode & 0o777 == 0o755


def test_an_existing_sqlite_database_left_readable_is_made_private(tmp_path: Path) -> None:
    """A fleet.db made before (0644, with its -wal and -shm) is made 0600 when an engine first connects."""
    path = tmp_path / "fleet.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("CREATE TABLE t (x)")
    raw.execute("INSERT INTO t VALUES (1)")
    raw.commit()
    for name in ("fleet.db", "fleet.db-wal", "fleet.db-shm"):
        (tmp_path / name).chmod(0o644)
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT x FROM t").scalar_one() == 1
        assert _modes(tmp_path) == {"fleet.db": 0o600, "fleet.db-wal": 0o600, "fleet.db-shm": 0o600}
    finally:
        engine.dispose()
        raw.close()


def test_sqlite_folder_is_created_on_first_connect(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "fleet.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.check(engine)
        db.upgrade(engine)
        assert path.is_file()
        assert db.current_revision(engine) == head_revision(engine)
    finally:
        engine.dispose()


def test_plain_postgresql_url_uses_psycopg(pg_server: str) -> None:
    server = pg_server.replace("postgresql+psycopg://", "postgresql://")
    engine = db.make_engine(f"{server}/postgres")
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        db.check(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["not a url", "mysql://u@localhost/x", "mongodb://localhost/x"])
def test_unusable_database_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        db.make_engine(url)


def test_unreachable_postgresql_is_unavailable_and_hides_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        engine = db.make_engine(f"postgresql://fleet:hunter2-secret@127.0.0.1:{port}/fleet")
        try:
            with pytest.raises(UnavailableError) as caught:
                db.check(engine)
            with pytest.raises(UnavailableError) as caught_upgrade:
                db.upgrade(engine)
        finally:
            engine.dispose()
    for exc in (caught.value, caught_upgrade.value):
        assert "hunter2" not in str(exc)
    assert f"127.0.0.1:{port}" in str(caught.value)


def _terminate_backends(pg_server: str, engine: Engine) -> None:
    """What a restart, a failover behind a proxy or an operator's pg_terminate_backend does to the pooled
    connections of `engine`: ended by the server, then gone (waited for, not slept on)."""
    name = engine.url.database
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")
    count = text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            wait_for(lambda: conn.execute(count, {"name": name}).scalar_one() == 0, 10, "the backends to exit")
    finally:
        admin.dispose()


@pytest.fixture
def pg_engine(pg_server: str) -> Iterator[Engine]:
    url = new_pg_database(pg_server)
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()
    drop_pg_database(url)


def test_a_connection_the_server_closed_a_moment_after_its_use_is_replaced_unseen(pg_server: str,
                                                                                  pg_engine: Engine) -> None:
    """The server ends a pooled connection right after its last use: the next checkout replaces it and the
    caller's statement succeeds (a ping only for connections idle a second let it through, and failed)."""
    with pg_engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    _terminate_backends(pg_server, pg_engine)
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid


def test_an_orphaned_attempts_spend_is_booked_after_the_server_closed_a_pooled_connection(
        pg_server: str, pg_engine: Engine) -> None:
    """Found by review: an attempt that lost its run books what it spent with one try. Its pooled connection
    was closed by the server a moment after its last use; the booking must still count against the caps."""
    from types import SimpleNamespace

    from fleet import executor
    from fleet.keys import GLOBAL
    from fleet.models import SpendDay
    from tests.test_ledger import DAY, NOW, reserved_run

    run = reserved_run(pg_engine, 100_000)  # leaves a pooled connection checked in just now
    _terminate_backends(pg_server, pg_engine)
    services = SimpleNamespace(engine=pg_engine, now=lambda: NOW,
                               config=SimpleNamespace(fleet=SimpleNamespace(outcome_retry_s=0.1)))  # one try
    executor._book_orphaned_spend(services, run, 70_000)  # type: ignore[arg-type]
    with db.session(pg_engine) as session:
        row = session.get(SpendDay, (DAY, GLOBAL))
        assert row is not None and row.spent_micros == 70_000, "the orphaned attempt's spend was never booked"


def _round_trips_of_checkouts(engine: Engine, proxy: FaultProxy, checkouts: int) -> int:
    with engine.connect() as conn:  # leaves one warm connection in the pool
        conn.execute(text("SELECT 1"))
    before = proxy.upstream_chunks
    for _ in range(checkouts):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    return proxy.upstream_chunks - before


def test_a_healthy_pooled_connection_is_checked_out_without_a_round_trip(pg_engine: Engine) -> None:
    """A checkout of a pooled connection the server has not closed sends nothing: Fleet's checkouts cost
    no more round trips than a pool with no liveness check at all (a pre-ping costs one per checkout)."""
    proxy, via_proxy = _via_proxy(pg_engine)
    fleets, unchecked = db.make_engine(via_proxy), create_engine(via_proxy, pool_pre_ping=False)
    try:
        no_check = _round_trips_of_checkouts(unchecked, proxy, 20)
        ours = _round_trips_of_checkouts(fleets, proxy, 20)
    finally:
        fleets.dispose()
        unchecked.dispose()
        proxy.stop()
    assert no_check >= 20, "the proxy did not see the statements"
    assert ours <= no_check, f"Fleet's 20 checkouts took {ours} round trips, a pool without a check {no_check}"


def _via_proxy(engine: Engine) -> tuple[FaultProxy, str]:
    url = engine.url
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
    return proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def test_a_connection_idle_a_while_whose_server_host_vanished_is_replaced_unseen(
        pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a server host gone without a word (a crash, a failover that moved its address) sends
    no close, so a look at the socket sees nothing; a connection idle for PING_AFTER_IDLE_S is pinged, the
    ping meets the RST and the pool connects afresh before the caller's statement (the write-once callers,
    an orphaned attempt's spend after a long run or a beat tick, find their connection idle that long)."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.2)
    proxy, via_proxy = _via_proxy(pg_engine)
    engine = db.make_engine(via_proxy)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        used = time.monotonic()
        proxy.vanish()  # new connections still reach a server (the new primary)
        wait_for(lambda: time.monotonic() - used > db.PING_AFTER_IDLE_S, 5, "the connection to be idle that long")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
        proxy.stop()


def test_a_fresh_connection_the_server_ends_gives_the_caller_the_drivers_error(pg_server: str,
                                                                                pg_engine: Engine) -> None:
    """Found by review: a connection just made is not checked again (it answered a moment ago). When the server
    ends each new session as it comes (going down), the caller gets the driver's OperationalError, which
    Fleet reports as the database unreachable (75), not the pool's "This connection is closed"."""
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")

    def terminate(pid: int) -> None:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            gone = text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid")
            wait_for(lambda: conn.execute(gone, {"pid": pid}).scalar_one(), 10, "the backend to exit")

    try:
        _terminate_backends(pg_server, pg_engine)
        event.listen(pg_engine, "connect", lambda dbapi, _record: terminate(dbapi.info.backend_pid))
        with pytest.raises(OperationalError), pg_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        admin.dispose()
