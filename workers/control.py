"""Celery remote control: `fleet kill --hard`, and each host's own orphan sweep.

The kill flag stops healthy executors within a second. A wedged one (stuck in a system call, say)
never reads it, so after a short grace every fleet.execute still running in the killed scope is
revoked with terminate; the launcher stops the agent's group once its executor is gone, and the
reaper ends the run as killed.

`fleet_orphans` runs in every worker's main process when broadcast: the host that owns a process
group is the one that may kill it (fleet/orphans.py).
"""

from __future__ import annotations

import re
import time
from typing import Any

from celery.worker.control import control_command
from sqlmodel import col, select

from fleet import db, orphans
from fleet.models import Run, RunStatus
from fleet.services import Services, build, utcnow
from workers.app import app, settings

GRACE_S = 2.0


def _still_running(services: Services, agent: str | None) -> set[str]:
    with db.session(services.engine) as session:
        query = select(Run.id).where(col(Run.status) == RunStatus.RUNNING)
        if agent is not None:
            query = query.where(Run.agent == agent)
        return set(session.exec(query))


@control_command()
def fleet_orphans(state: Any) -> dict[str, Any]:
    """Kill this host's orphaned agents and report them (broadcast by the fleet.sweep.orphans task)."""
    # Clients of its own, closed at once: the main process must keep none to fork into pool children.
    services = build(settings)
    try:
        return {"ok": orphans.sweep_host(services, utcnow()).to_json()}
    finally:
        services.close()


def _run_of(task: dict[str, Any]) -> str | None:
    """The run an active fleet.execute works on: its task id names it; `inspect` shows args only as a repr."""
    found = re.search(r"[0-9a-f]{32}", f"{task.get('id', '')} {task.get('args', '')}")
    return found.group(0) if found else None


def hard_stop(services: Services, agent: str | None, grace_s: float = GRACE_S) -> int:
    """After `grace_s`, revoke with terminate the in-flight executes of runs still running; how many."""
    deadline = time.monotonic() + grace_s
    running = _still_running(services, agent)
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = _still_running(services, agent)
    if not running:
        return 0
    active: dict[str, list[dict[str, Any]]] = app.control.inspect(timeout=2.0).active() or {}
    ids = [task["id"] for tasks in active.values() for task in tasks
           if task.get("name") == "fleet.execute" and _run_of(task) in running]
    if ids:
        app.control.revoke(ids, terminate=True, signal="SIGKILL")
    return len(ids)
