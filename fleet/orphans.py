"""Orphans: agent processes alive on this host whose run is over, or owned by another attempt.

The launcher stops its group when its executor dies or stops proving ownership, so an orphan
should never live long; this is the check that proves it, live (invariant I4 of the fault suite).
Each worker host looks at its own processes only (the host that owns a process group is the one
that may kill it): every launcher names its attempt in its argv (`run=RUN_ID:FENCE`), so a scan
of /proc finds them, and the database says which are still owned. An orphan is killed, checked
against its start time so that a reused pid is never hit, and counted per host in Redis for the
watchdog and /metrics.
"""

from __future__ import annotations

import json
import os
import select as fd_select
import signal
from dataclasses import asdict, dataclass
from datetime import datetime

import redis
from sqlmodel import col, select

from fleet import db, keys
from fleet.launcher import UNSET
from fleet.models import Run, RunStatus
from fleet.services import Services

REPORT_TTL_S = 300  # a host that stops reporting drops out of the count rather than lingering


@dataclass(frozen=True)
class LocalAgent:
    """A launcher process on this host, and the attempt it names."""

    pid: int
    start_ticks: int  # /proc/PID/stat field 22: with the pid, names one process for its whole life
    run_id: str
    fence: int


@dataclass
class HostReport:
    """What one scan of this host found."""

    host: str
    at: str
    agents: int  # launchers of this fleet's runs seen alive
    orphans: list[str]  # "run_id:fence" of each orphan found (and killed)

    def to_json(self) -> dict[str, object]:
        """Plain JSON."""
        return asdict(self)


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def _tag(pid: int) -> tuple[str, int] | None:
    """The `run=RUN_ID:FENCE` of a Fleet launcher's argv, or None for any other process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return None
    # The Python launcher (`python -I -S .../launcher.py`) or the compiled one (`.../launcher-<hash>`).
    if not any(arg.endswith(b"/launcher.py") or b"/launcher-" in arg for arg in argv[:4]):
        return None
    for arg in argv:
        if arg == b"--":
            return None
        if arg.startswith(b"run=") and arg != f"run={UNSET}".encode():
            run_id, _, fence = arg[4:].decode("ascii", "replace").rpartition(":")
            return (run_id, int(fence)) if fence.isdigit() else None
    return None


def scan() -> list[LocalAgent]:
    """Every live Fleet launcher on this host (in this PID namespace)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        tag = _tag(int(name))
        fields = _stat(int(name)) if tag else None
        if tag and fields and fields[0] not in (b"Z", b"X"):
            found.append(LocalAgent(int(name), int(fields[19]), tag[0], tag[1]))
    return found


def judge(services: Services, agents: list[LocalAgent]) -> tuple[list[LocalAgent], list[LocalAgent]]:
    """(ours, orphans): the launchers of runs this fleet's database knows, and those of them whose run is not
    running under their own fence (finished, or taken over). A run the database does not know belongs to
    another fleet on the same host: not ours to judge, let alone kill."""
    if not agents:
        return [], []
    with db.session(services.engine) as session:
        rows = {run.id: (run.status, run.fence) for run in session.exec(
            select(Run).where(col(Run.id).in_({a.run_id for a in agents})))}
    ours = [a for a in agents if a.run_id in rows]
    return ours, [a for a in ours if rows[a.run_id] != (RunStatus.RUNNING, a.fence)]


LAUNCHER_KILL_S = 2.0  # a launcher asked to kill that has not exited by then is wedged: SIGKILL its group


def kill(agent: LocalAgent) -> bool:
    """Kill an orphan's whole tree, only if its launcher is still the very process that was scanned.

    The launcher is asked (SIGCONT, SIGUSR1: fleet/launcher.py) and kills every descendant, those that left
    the group too, before it exits; a group SIGKILL would take it first and leave those to init. Only a
    launcher that has not exited LAUNCHER_KILL_S later gets the group SIGKILL."""
    try:
        pidfd = os.pidfd_open(agent.pid)
    except OSError:
        return False  # gone already
    try:
        fields = _stat(agent.pid)
        if fields is None or int(fields[19]) != agent.start_ticks:
            return False  # the pid was reused: not ours to touch
        # While the pidfd is open, what it signals is that very launcher, and its pid (the group's id) is
        # not reused until it is reaped: by its parent, so a launcher that exited may still be a zombie.
        signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        signal.pidfd_send_signal(pidfd, signal.SIGUSR1)
        if not fd_select.select([pidfd], [], [], LAUNCHER_KILL_S)[0]:
            os.killpg(agent.pid, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def sweep_host(services: Services, now: datetime) -> HostReport:
    """Find this host's orphans, kill them, and publish the count for the watchdog and /metrics."""
    ours, found = judge(services, scan())
    for orphan in found:
        kill(orphan)
    report = HostReport(services.host, now.isoformat(), len(ours), [f"{o.run_id}:{o.fence}" for o in found])
    services.redis.set(keys.orphans(services.host), json.dumps(report.to_json()), ex=REPORT_TTL_S)
    return report


def reports(client: redis.Redis) -> list[HostReport]:
    """The latest report of every host that reported within REPORT_TTL_S."""
    names = sorted(client.scan_iter(keys.orphans("*")))
    values = client.mget(names) if names else []
    out = []
    for value in values:
        if value:
            try:
                out.append(HostReport(**json.loads(value)))
            except (TypeError, ValueError):
                continue
    return out
