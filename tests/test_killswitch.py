"""The kill switch on its own (real Redis, real SQLite and PostgreSQL, no workers): the flag reaches Redis
before the database is touched, a mirror that cannot be written is repaired by the watchdog, resume keeps
the fleet stopped whatever fails, bad input is refused before anything is set, and a flag Fleet did not
write still kills."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from fleet import actions, db, keys, killflag, killswitch, pause, watchdog
from fleet.errors import BadInputError, ExitCode, KillNotMirroredError, UnavailableError
from fleet.keys import GLOBAL
from fleet.models import KillSwitch, RunEvent
from fleet.services import Services, utcnow
from fleet.state import snapshot
from tests.harness import ROOT, wait_for

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def engage(engine: Engine, client: redis_lib.Redis, reason: str | None = "test", scope: str = GLOBAL,
           **kwargs: Any) -> killswitch.Engagement:
    return killswitch.engage(engine, client, scope=scope, reason=reason, actor="test", hard=False, now=utcnow(),
                             **kwargs)


def mirror_row(engine: Engine, scope: str = GLOBAL) -> KillSwitch | None:
    with db.session(engine) as session:
        return session.get(KillSwitch, scope)


@contextmanager
def sqlite_write_lock(database_url: str) -> Iterator[None]:
    """Another process's writer: BEGIN IMMEDIATE held open on its own connection."""
    path = make_url(database_url).database
    assert path
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def unreachable_database(kind: str, tmp_path: Path, closed_port: int) -> str:
    if kind == "sqlite":
        (tmp_path / "a-file").write_text("not a folder")
        return f"sqlite:///{tmp_path / 'a-file' / 'fleet.db'}"  # cannot be opened, not even by root
    return f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/fleet"  # refused


# ---------------------------------------------------------------- Redis first, the mirror after


@SQLITE_ONLY
def test_the_flag_reaches_redis_at_once_while_another_process_holds_the_sqlite_write_lock(
        services: Services) -> None:
    with ThreadPoolExecutor(1) as pool:
        with sqlite_write_lock(services.settings.database_url):
            started = time.monotonic()
            pending = pool.submit(engage, services.engine, services.redis, "lock held")
            wait_for(lambda: services.redis.exists(keys.kill()), 0.5, "the flag in Redis with the database locked")
            print(f"\nflag in Redis {1000 * (time.monotonic() - started):.0f} ms after engage, database locked")
            assert killswitch.check_redis(services.redis, "echo").killed
            assert not pending.done()  # the mirror waits for the lock, within its bound
        outcome = pending.result(timeout=10)  # the lock is gone: the mirror is written
    assert outcome.in_redis and outcome.mirrored
    row = mirror_row(services.engine)
    assert row is not None and row.engaged and row.reason == "lock held"


@SQLITE_ONLY
def test_a_mirror_that_cannot_be_written_leaves_the_kill_in_force_and_the_watchdog_writes_it(
        services: Services) -> None:
    with sqlite_write_lock(services.settings.database_url):
        started = time.monotonic()
        outcome = engage(services.engine, services.redis, "mirror pending", mirror_deadline_s=0.5)
        elapsed = time.monotonic() - started
        assert killswitch.check_redis(services.redis, None).killed
    assert outcome.in_redis and not outcome.mirrored and elapsed < 2.0  # bounded, not busy_timeout's 30 s
    with pytest.raises(KillNotMirroredError, match="IS in force") as caught:
        outcome.confirm()
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert mirror_row(services.engine) is None
    shown = [k for k in snapshot(services)["kill"] if k["scope"] == GLOBAL]  # `fleet status`, the page, /metrics
    assert [(k["reason"], k["mirrored"]) for k in shown] == [("mirror pending", False)]
    healed = watchdog.heal(services)
    assert any("mirror" in line for line in healed), healed
    row = mirror_row(services.engine)
    assert row is not None and row.engaged and (row.reason, row.actor) == ("mirror pending", "test")
    assert watchdog.heal(services) == []  # nothing twice


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_flag_reaches_redis_with_the_database_unreachable(redis: redis_lib.Redis, tmp_path: Path,
                                                               closed_port: int, kind: str) -> None:
    engine = db.make_engine(unreachable_database(kind, tmp_path, closed_port))
    try:
        outcome = engage(engine, redis, "database down", mirror_deadline_s=0.3)
    finally:
        engine.dispose()
    assert outcome.in_redis and not outcome.mirrored
    state = killswitch.check_redis(redis, "echo")
    assert state.killed and state.reason == "database down"
    with pytest.raises(KillNotMirroredError, match="IS in force"):
        outcome.confirm()


def test_fleet_kill_with_the_database_down_exits_75_saying_the_kill_is_in_force(
        redis: redis_lib.Redis, redis_url: str, tmp_path: Path, closed_port: int) -> None:
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(ROOT), FLEET_CONFIG=str(tmp_path / "fleet.toml"), FLEET_LOG_DIR=str(tmp_path / "logs"),
               FLEET_REDIS_URL=redis_url, FLEET_DATABASE_URL=unreachable_database("postgresql", tmp_path, closed_port))

    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet", *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)

    too_long = fleet("kill", "--reason", "x" * (killflag.MAX_REASON + 1))
    assert too_long.returncode == ExitCode.USAGE, too_long.stdout + too_long.stderr
    assert "reason" in too_long.stderr and not redis.exists(keys.kill())
    killed = fleet("kill", "--reason", "database down")
    assert killed.returncode == ExitCode.TRANSIENT, killed.stdout + killed.stderr
    assert "IS in force" in killed.stderr and "Traceback" not in killed.stderr
    assert killswitch.check_redis(redis, None).reason == "database down"
    # --hard looks up the running runs in the database to revoke their tasks: that failing must not end in
    # "nothing was written; safe to retry", said of a kill that is in force.
    hard = fleet("kill", "--hard", "--reason", "database down, hard")
    assert hard.returncode == ExitCode.TRANSIENT, hard.stdout + hard.stderr
    assert "IS in force" in hard.stderr and "nothing was written" not in hard.stderr, hard.stdout + hard.stderr
    assert "nothing revoked" in hard.stdout + hard.stderr, hard.stdout + hard.stderr
    assert killswitch.check_redis(redis, None).reason == "database down, hard"


_IMPORT_WATCH = """
import importlib.abc, runpy, sys
import redis
client, flag = redis.Redis.from_url(sys.argv[1]), sys.argv[2]
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sqlalchemy" and not seen:
            seen.append(client.exists(flag))
        return None
sys.meta_path.insert(0, Watch())
sys.argv = ["fleet", "kill", "--reason", "at 2am"]
try:
    runpy.run_module("fleet", run_name="__main__")
except SystemExit:
    pass
print("flag set when the database layer was first imported:", seen, file=sys.stderr)
"""


def test_fleet_kill_raises_the_flag_before_it_imports_the_database_layer(
        redis: redis_lib.Redis, redis_url: str, tmp_path: Path) -> None:
    """The quarter of a second SQLAlchemy and SQLModel take to import is spent after agents start stopping,
    not before: the first import of sqlalchemy by `fleet kill` already finds the flag in Redis."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\nest_cost_usd = 0.01\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(ROOT), FLEET_CONFIG=str(tmp_path / "fleet.toml"), FLEET_LOG_DIR=str(tmp_path / "logs"),
               FLEET_REDIS_URL=redis_url, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_WATCH, redis_url, keys.kill()], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert "imported: [1]" in proc.stderr, proc.stdout + proc.stderr
    assert killswitch.check_redis(redis, None).reason == "at 2am"


# ---------------------------------------------------------------- bad input: refused before anything is set


def test_an_over_long_or_nul_reason_is_refused_before_anything_is_set(services: Services) -> None:
    for bad in ("x" * (killflag.MAX_REASON + 1), "a\x00b"):
        with pytest.raises(BadInputError, match="reason"):
            engage(services.engine, services.redis, bad)
        assert not services.redis.exists(keys.kill()) and mirror_row(services.engine) is None
    longest = "é" * killflag.MAX_REASON  # characters, not bytes: 2,000 bytes of UTF-8
    engage(services.engine, services.redis, longest).confirm()
    row = mirror_row(services.engine)
    assert row is not None and row.reason == longest
    assert killswitch.check_redis(services.redis, None).reason == longest


def test_a_reason_that_is_not_utf8_is_refused_by_kill_and_pause_before_anything_is_set(
        services: Services, redis_url: str, database_url: str, tmp_path: Path) -> None:
    """A reason typed in a Latin-1 terminal reaches Python as lone surrogates (argv's surrogateescape): the Redis
    flag took it (JSON escapes them), then the mirror's write failed with a UnicodeEncodeError traceback (exit 1),
    leaving a kill or pause in Redis that the database never heard of. Refused up front (65), like a NUL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(ROOT), FLEET_CONFIG=str(tmp_path / "fleet.toml"), FLEET_LOG_DIR=str(tmp_path / "logs"),
               FLEET_REDIS_URL=redis_url, FLEET_DATABASE_URL=database_url)
    for args in ([b"kill"], [b"kill", b"echo"], [b"pause"], [b"pause", b"echo"]):
        proc = subprocess.run([sys.executable.encode(), b"-m", b"fleet", *args, b"--reason", b"caf\xe9 closed"],
                              env=env, cwd=tmp_path, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                              check=False)
        said = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode == ExitCode.USAGE and "Traceback" not in said, (args, said)
        assert "reason" in said and "UTF-8" in said, (args, said)
        flags = [keys.kill(), keys.kill("echo"), keys.paused(GLOBAL), keys.paused("echo")]
        assert not services.redis.exists(*flags), (args, said)
    assert mirror_row(services.engine) is None and mirror_row(services.engine, "echo") is None


# ---------------------------------------------------------------- resume: the mirror first, then Redis


def test_resume_with_the_database_down_keeps_the_fleet_stopped(services: Services, tmp_path: Path,
                                                                closed_port: int) -> None:
    engage(services.engine, services.redis).confirm()
    down = db.make_engine(unreachable_database("postgresql", tmp_path, closed_port))
    try:
        with pytest.raises(SQLAlchemyError):
            killswitch.release(down, services.redis, scope=GLOBAL, actor="test", now=utcnow())
    finally:
        down.dispose()
    assert killswitch.check_redis(services.redis, None).killed
    row = mirror_row(services.engine)
    assert row is not None and row.engaged


def test_resume_with_redis_down_keeps_the_flag_and_the_watchdog_does_not_put_the_mirror_back(
        services: Services, closed_port: int) -> None:
    engage(services.engine, services.redis).confirm()
    down = redis_lib.Redis(port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    with pytest.raises(UnavailableError, match="still holds the flag"):
        killswitch.release(services.engine, down, scope=GLOBAL, actor="test", now=utcnow())
    assert killswitch.check_redis(services.redis, None).killed  # stopped until `fleet resume` succeeds
    assert watchdog.heal(services) == []  # the mirror was released after this kill: not a lost mirror
    row = mirror_row(services.engine)
    assert row is not None and not row.engaged
    killswitch.release(services.engine, services.redis, scope=GLOBAL, actor="test", now=utcnow())
    assert not killswitch.check_redis(services.redis, None).killed


def releases(services: Services, agent: str) -> list[str]:
    """The release events of `agent` in the audit trail, oldest first."""
    with db.session(services.engine) as session:
        return [e.kind for e in session.exec(select(RunEvent).where(RunEvent.agent == agent).order_by(
            col(RunEvent.id))) if e.kind.endswith(".released")]


def test_resume_records_the_release_of_only_what_was_engaged(services: Services) -> None:
    """`fleet resume echo` of an agent only paused, or neither paused nor killed, wrote `kill.released`: the
    audit trail said a kill was lifted that never was."""
    pause.engage(services.engine, services.redis, scope="echo", reason="maintenance", actor="test", now=utcnow())
    said = actions.resume(services, agent="echo", actor="test").said
    assert said == "resumed agent echo (pause lifted)"
    assert releases(services, "echo") == ["pause.released"]
    said = actions.resume(services, agent="echo", actor="test").said
    assert said == "resumed agent echo (it was neither killed nor paused)"
    assert releases(services, "echo") == ["pause.released"]
    engage(services.engine, services.redis, scope="echo").confirm()
    said = actions.resume(services, agent="echo", actor="test").said
    assert said == "resumed agent echo (kill switch released)"
    assert releases(services, "echo") == ["pause.released", "kill.released"]
    assert not killswitch.check_redis(services.redis, "echo").killed


# ---------------------------------------------------------------- flags Fleet did not write


@pytest.mark.parametrize("value", ["1", "", "not json {", "[1, 2]", '"a string"', "null", "3.5",
                                   '{"reason": 5, "actor": ["x"]}', b"\xff\xfe not utf-8"])
def test_a_flag_fleet_did_not_write_kills_with_a_reason(redis: redis_lib.Redis, value: str | bytes) -> None:
    for scope in ("echo", GLOBAL):
        redis.set(keys.kill(scope), value)
        state = killswitch.check_redis(redis, "echo")
        assert state.killed and state.scope == scope and state.reason, state
        assert isinstance(state.reason, str) and "no reason" not in state.describe()
        assert state.actor is None or isinstance(state.actor, str)
        redis.delete(keys.kill(scope))
    assert not killswitch.check_redis(redis, "echo").killed


def test_a_flag_set_by_hand_gets_its_mirror_from_the_watchdog(services: Services) -> None:
    services.redis.set(keys.kill("echo"), "1")  # redis-cli SET fleet:kill:echo 1
    assert any("mirror" in line for line in watchdog.heal(services))
    row = mirror_row(services.engine, "echo")
    assert row is not None and row.engaged and row.reason and "not written by Fleet" in row.reason
    with db.session(services.engine) as session:
        assert killswitch.check(session, services.redis, "echo").killed
    services.redis.delete(keys.kill("echo"))  # Redis lost it: the mirror puts it back
    with db.session(services.engine) as session:
        assert killswitch.check(session, services.redis, "echo").killed
    assert json.loads(services.redis.get(keys.kill("echo")) or "{}")["actor"] == "watchdog"


@pytest.mark.parametrize("switch", [killswitch, pause], ids=["kill", "pause"])
def test_a_first_engage_and_release_of_a_scope_at_once_both_land(services: Services, switch: Any) -> None:
    """`fleet kill echo` and `fleet resume echo` at once, for an agent never killed before: both read no row and
    both inserted one, and the loser failed on the primary key as "database unreachable ... safe to retry" (75;
    seen in CI). Both land, in either order, and the mirror ends as the last one left it."""
    import threading

    for i in range(12):
        scope = f"race-{i}"
        both = threading.Barrier(2)

        def engage(scope: str = scope, both: threading.Barrier = both) -> None:
            both.wait()
            if switch is killswitch:
                switch.engage(services.engine, services.redis, scope=scope, reason="race", actor="test", hard=False,
                              now=utcnow()).confirm()
            else:
                switch.engage(services.engine, services.redis, scope=scope, reason="race", actor="test",
                              now=utcnow())

        def release(scope: str = scope, both: threading.Barrier = both) -> None:
            both.wait()
            switch.release(services.engine, services.redis, scope=scope, actor="test", now=utcnow())

        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(engage), pool.submit(release)]:
                future.result()  # raises what the thread raised
