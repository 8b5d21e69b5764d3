"""The soak's faults: each one hurts the fleet for a while, then lets it heal, and says what it did.

Every kind is one the fault suite proves alone (tests/faults/); the soak strings them together.
A fault runs in the soak's main thread: `inject` breaks something, holds it `hold_s`, mends it, and
returns a `Fault` stamped with the wall clock (the clock the agents' effects log uses).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.fleet import FaultFleet
from tests.faults.proxy import BLACKHOLE, PASS

# The faults that must reach Sentry, and as which alert: exactly once each (not zero, not a storm).
EXPECTED_ALERT = {"redis_restart": "redis_restart", "kill_resume": "kill_engaged"}
CLOCK_JUMP_S = 3600.0  # one worker an hour ahead: a VM resumed with a stale offset


@dataclass
class Fault:
    """One fault as it happened."""

    n: int
    kind: str
    start: float
    end: float = 0.0
    detail: str = ""
    alerts: dict[str, int] = field(default_factory=dict)  # filled in by the checker
    recovered_s: float | None = None  # fault end to the first attempt after it that succeeded

    @property
    def expected_alert(self) -> str | None:
        """The alert this fault must raise, once."""
        return EXPECTED_ALERT.get(self.kind)


@dataclass
class Holds:
    """How long each fault lasts (the --quick soak uses shorter ones)."""

    freeze_s: float
    db_outage_s: float
    kill_s: float
    bad_config_s: float
    clock_s: float

    @classmethod
    def for_run(cls, quick: bool) -> Holds:
        """Long enough that leases lapse (lease_ttl_s is 5) and the watchdog may look (every minute)."""
        return cls(8, 8, 3, 6, 10) if quick else cls(30, 20, 10, 30, 60)


class Workers:
    """The worker slots, kept alive as a supervisor would: a slot whose worker died gets a new one.

    Slot 0 runs with clockshift.so preloaded when it could be built, so its clock can be jumped.
    """

    def __init__(self, faults: FaultFleet, slots: int, concurrency: int, clockshift: Path | None) -> None:
        self.faults, self.concurrency, self.clockshift = faults, concurrency, clockshift
        self.clock_file = faults.fleet.tmp / "clock-offset"
        self.clock_file.write_text("0\n")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.gone: list[subprocess.Popen[bytes]] = []  # workers that died: their groups are checked for orphans
        self.unexpected: list[str] = []  # deaths no fault caused
        for slot in range(slots):
            self.procs.append(self._spawn(slot))

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        env = {}
        if slot == 0 and self.clockshift is not None:
            env = {"LD_PRELOAD": str(self.clockshift), "CLOCKSHIFT_FILE": str(self.clock_file)}
        return self.faults.fleet.start_worker(concurrency=self.concurrency, env=env)

    def replace(self, slot: int) -> None:
        """Start a new worker in a slot whose worker is gone."""
        old = self.procs[slot]
        if old in self.faults.fleet.workers:
            self.faults.fleet.workers.remove(old)
        self.gone.append(old)
        self.procs[slot] = self._spawn(slot)

    def supervise(self, now: float) -> None:
        """Restart any worker that exited on its own, and remember that it did."""
        for slot, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                self.unexpected.append(f"worker slot {slot} (pid {proc.pid}) exited by itself with {code} "
                                       f"at {time.strftime('%H:%M:%S', time.localtime(now))}")
                self.replace(slot)

    def pool(self, slot: int) -> list[int]:
        """The pool processes of a slot's worker."""
        return _children(self.procs[slot].pid)

    def tree(self) -> list[int]:
        """Every live worker process: the main ones and their pools (not the agents)."""
        pids = []
        for slot, proc in enumerate(self.procs):
            if proc.poll() is None:
                pids += [proc.pid, *self.pool(slot)]
        return pids


class Injector:
    """Draws the next fault (round-robin over a seeded shuffle) and carries it out."""

    def __init__(self, faults: FaultFleet, workers: Workers, holds: Holds, seed: int,
                 on_hold: Callable[[], None]) -> None:
        self.faults, self.workers, self.holds = faults, workers, holds
        self.rng = random.Random(seed)
        self.on_hold = on_hold  # called about twice a second while a fault holds (keeps the soak's books)
        self.skipped: list[str] = []
        kinds = ["worker_main_kill", "pool_child_kill", "worker_freeze", "redis_restart", "db_outage",
                 "kill_resume", "bad_config", "clock_jump"]
        if faults.kind == "postgresql":
            kinds.append("pg_restart")
        else:
            self.skipped.append("pg_restart: the database is SQLite (no server to restart)")
        if workers.clockshift is None:
            kinds.remove("clock_jump")
            self.skipped.append("clock_jump: clockshift.so could not be built (no C compiler)")
        self.rng.shuffle(kinds)
        self.kinds = kinds
        self.done: list[Fault] = []

    def next(self) -> Fault:
        """Inject the next fault and return it once the fleet has been let go again."""
        kind = self.kinds[len(self.done) % len(self.kinds)]
        fault = Fault(len(self.done) + 1, kind, time.time())
        fault.detail = getattr(self, f"_{kind}")(fault)
        fault.end = time.time()
        self.done.append(fault)
        return fault

    def _hold(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.on_hold()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------ the kinds

    def _worker_main_kill(self, fault: Fault) -> str:
        slot = self.rng.randrange(len(self.workers.procs))
        proc = self.workers.procs[slot]
        busy = len(self.workers.pool(slot))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.workers.replace(slot)
        return f"SIGKILL worker slot {slot} main pid {proc.pid} ({busy} pool processes left behind); restarted"

    def _pool_child_kill(self, fault: Fault) -> str:
        slot = self.rng.randrange(len(self.workers.procs))
        pool = self.workers.pool(slot)
        running = [p for p in pool if _children(p)]  # a pool process with a launcher under it runs an agent
        if not pool:
            return f"worker slot {slot} had no pool process"
        victim = self.rng.choice(running or pool)
        os.kill(victim, signal.SIGKILL)
        return f"SIGKILL pool process {victim} of slot {slot} ({'running an agent' if running else 'idle'})"

    def _worker_freeze(self, fault: Fault) -> str:
        slot = self.rng.randrange(len(self.workers.procs))
        pid = self.workers.procs[slot].pid
        self.faults.freeze(pid, group=True)
        try:
            self._hold(self.holds.freeze_s)
        finally:
            os.killpg(pid, signal.SIGCONT)
        return f"SIGSTOP worker slot {slot} (pid {pid} and its pool) for {self.holds.freeze_s:.0f} s, then SIGCONT"

    def _redis_restart(self, fault: Fault) -> str:
        self.faults.redis_server.stop()
        self.faults.redis_server.start()
        return f"redis-server on port {self.faults.redis_server.port} killed and started again, empty"

    def _pg_restart(self, fault: Fault) -> str:
        assert self.faults.cluster is not None
        self.faults.cluster.restart_immediately()
        return "PostgreSQL stopped with -m immediate (a crash) and started again"

    def _db_outage(self, fault: Fault) -> str:
        seconds = self.holds.db_outage_s
        if self.faults.db_proxy is not None:
            self.faults.db_proxy.set(BLACKHOLE)
            try:
                self._hold(seconds)
            finally:
                self.faults.db_proxy.set(PASS)
            return f"database blackholed for {seconds:.0f} s (connections open, nothing answers)"
        path = self.faults.fleet.direct_database_url.removeprefix("sqlite:///")
        lock = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # SQLite's analogue: no write gets through
            self._hold(seconds)
            lock.execute("ROLLBACK")
        finally:
            lock.close()
        return f"SQLite write lock held by an outsider for {seconds:.0f} s"

    def _kill_resume(self, fault: Fault) -> str:
        reason = f"soak fault {fault.n}"
        killed = self.faults.fleet.cli("kill", "--reason", reason)
        self._hold(self.holds.kill_s)
        resumed = self.faults.fleet.cli("resume")
        return (f"fleet kill --reason '{reason}' (exit {killed.returncode}), {self.holds.kill_s:.0f} s, "
                f"fleet resume (exit {resumed.returncode})")

    def _bad_config(self, fault: Fault) -> str:
        path = self.faults.fleet.config_path
        good = path.read_text()
        path.write_text(good + "\n[agents.broken\ncommand = 5\n")  # not even TOML
        try:
            self._hold(self.holds.bad_config_s)
        finally:
            path.write_text(good)
        return f"fleet.toml made invalid for {self.holds.bad_config_s:.0f} s, then restored"

    def _clock_jump(self, fault: Fault) -> str:
        self.workers.clock_file.write_text(f"{CLOCK_JUMP_S}\n")
        try:
            self._hold(self.holds.clock_s)
        finally:
            self.workers.clock_file.write_text("0\n")
        return (f"worker slot 0's wall clock jumped {CLOCK_JUMP_S:+.0f} s for {self.holds.clock_s:.0f} s, "
                "then back")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    return []
