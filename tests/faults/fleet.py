"""The fault fleet: a real worker on a private Redis and a private database, each behind a fault proxy.

The fleet's own processes (workers, CLI) talk through the proxies; the checks talk to the servers
directly, so a fault never hides what happened. Shared by the fault suite (tests/faults/) and the
soak (bench/soak.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from fleet import sweeps
from tests.faults.effects import EffectsLog, check_all
from tests.faults.proxy import FaultProxy
from tests.faults.servers import PrivateCluster
from tests.harness import Fleet, PrivateRedis, wait_for

FAULT_AGENTS = """
[fleet]
daily_cap_usd = 100.0
lease_ttl_s = 5
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1
retry_backoff_s = 0.2
breaker_threshold = 1000
kill_unreachable_grace_s = 2
resend_after_s = 3

[agents.work]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "4",
           "--steps", "4", "--cost", "0.01", "--child"]
est_cost_usd = 0.04
timeout_s = 60
concurrency = 50

[agents.quick]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--cost", "0.01"]
est_cost_usd = 0.01
timeout_s = 60
concurrency = 100

[agents.long]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "12",
           "--steps", "12", "--cost", "0.01", "--child", "--ignore-term"]
est_cost_usd = 0.12
timeout_s = 60
concurrency = 5

[agents.poison]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "1",
           "--steps", "2", "--child", "--kill-worker"]
est_cost_usd = 0.01
timeout_s = 60

[agents.oom-once]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "3",
           "--steps", "2", "--child", "--ignore-term", "--kill-worker"]
est_cost_usd = 0.01
timeout_s = 60
"""


@dataclass
class FaultFleet:
    """A fleet with its servers and proxies, and the checker over its effects log."""

    kind: str
    fleet: Fleet
    redis_server: PrivateRedis
    redis_proxy: FaultProxy
    db_proxy: FaultProxy | None
    cluster: PrivateCluster | None
    accepted: set[str] = field(default_factory=set)

    @property
    def effects_path(self) -> Path:
        """Where the test agents record what they did."""
        return self.fleet.tmp / "effects.log"

    @property
    def effects(self) -> EffectsLog:
        """The effects log as it stands."""
        return EffectsLog.read(self.effects_path)

    def reap(self) -> sweeps.SweepReport:
        """One reaper pass, as beat would run it."""
        return self.fleet.reap()

    def reap_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Run the reaper every half second until `condition` holds."""
        def step() -> Any:
            self.reap()
            return condition()

        return wait_for(step, timeout, what, interval=0.5)

    def reap_for(self, seconds: float, until: Callable[[], Any] = lambda: False) -> None:
        """Run the reaper every half second for as long as a fault lasts (or until `until` holds)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            self.reap()
            time.sleep(0.5)

    def freeze(self, pid: int, group: bool = False) -> None:
        """SIGSTOP a fleet process (`group`: its whole process group, a worker's pool with it). On SQLite,
        only at a moment it does not hold the write lock: a process frozen inside a write transaction
        stalls every writer until it resumes (SQLite's one writer; the README says so), which is a
        database stall, not the fault this stands for."""
        signal_ = os.killpg if group else os.kill
        for _ in range(200):
            signal_(pid, signal.SIGSTOP)
            # kill() returns before the signal has stopped every thread: a thread still running could take
            # the lock just after the probe found it free (seen once in CI), so probe only once all have.
            wait_for(lambda: _all_stopped(pid, group), 10, f"process {pid} to stop", interval=0.001)
            if self.kind != "sqlite" or self._write_lock_free():
                return
            signal_(pid, signal.SIGCONT)
            time.sleep(0.02)
        raise AssertionError(f"process {pid} held the SQLite write lock at every try")

    def _write_lock_free(self) -> bool:
        database = self.fleet.direct_database_url.removeprefix("sqlite:///")
        probe = sqlite3.connect(database, timeout=0.3, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            probe.close()

    def violations(self, **caps: Any) -> list[str]:
        """Every broken invariant over the effects log and the database."""
        return check_all(self.effects_path, self.fleet.services.engine,
                         run_ids=self.accepted or None, **caps)


def _all_stopped(pid: int, group: bool) -> bool:
    """Whether every thread of `pid` (of every process in its group, with `group`) is stopped, or gone."""
    pids = [pid]
    if group:
        pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                and _stat_field(Path(f"/proc/{entry.name}/stat"), 2) == str(pid)]
    for one in pids:
        for task in Path(f"/proc/{one}/task").glob("*"):
            if _stat_field(task / "stat", 0) not in ("T", "t", "Z", "X", None):
                return False
    return True


def _stat_field(stat: Path, index: int) -> str | None:
    """A field of a /proc stat file after the command name (0: the state, 2: the process group), or None
    when the process or thread is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[-1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[index] if len(fields) > index else None


@contextlib.contextmanager
def fault_fleet(kind: str, tmp: Path, cluster: PrivateCluster | None, agents: str = FAULT_AGENTS,
                workers: int = 1, concurrency: int = 4, start: bool = True,
                sentry_dsn: str | None = None) -> Iterator[FaultFleet]:
    """A fault fleet on SQLite or PostgreSQL, its workers started (unless `start` is False); its processes
    report to `sentry_dsn` when one is given."""
    server = PrivateRedis(tmp)
    server.start()
    redis_proxy = FaultProxy("127.0.0.1", server.port).start()
    db_proxy = None
    if kind == "postgresql":
        if cluster is None:
            pytest.skip("no private PostgreSQL cluster can be made here")
        direct = cluster.new_database()
        db_proxy = FaultProxy("127.0.0.1", cluster.port).start()
        database = make_url(direct).set(port=db_proxy.port).render_as_string(hide_password=False)
    else:
        direct = database = f"sqlite:///{tmp / 'fleet.db'}"
    home = tmp / "fleet"
    home.mkdir()
    harness = Fleet(home, f"redis://127.0.0.1:{redis_proxy.port}/0", database, agents=agents,
                    direct_redis_url=server.url, direct_database_url=direct, sentry_dsn=sentry_dsn)
    faulty = FaultFleet(kind, harness, server, redis_proxy, db_proxy, cluster if kind == "postgresql" else None)
    try:
        if start:
            harness.start(workers=workers, concurrency=concurrency)
        else:
            harness.redis.flushdb()
            harness.cli("db", "upgrade", check=True)
        yield faulty
    finally:
        harness.stop()
        redis_proxy.stop()
        if db_proxy is not None:
            db_proxy.stop()
        server.stop()
