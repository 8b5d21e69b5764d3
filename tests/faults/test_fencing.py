"""A retry never starts while the old attempt may still live, whoever is slow, stopped or on another host."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import col

from fleet import db
from fleet.models import Run, RunStatus
from tests.faults.conftest import FaultFleet
from tests.faults.effects import pid_alive
from tests.harness import executor_of, wait_for
from tests.test_dispatch import run_of, send, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_a_stopped_executor_cannot_overlap_its_retry(faults: FaultFleet) -> None:
    """The pool process running an agent is SIGSTOPped past its lease, and the reaper runs on another host (as
    in compose, where it runs on the dispatch workers): the agent must be gone before the retry starts, and the
    stopped executor, woken, writes nothing over the retry."""
    result = send(faults.fleet, "long", f"stop-{uuid.uuid4().hex}")
    faults.accepted.add(result.run_id)
    start = wait_for(lambda: faults.effects.starts(result.run_id), 60, "the agent to start")[0]
    pool = executor_of(start.value)
    elsewhere = dataclasses.replace(faults.fleet.services, host="dispatch-host")
    faults.freeze(pool)
    try:
        wait_for(lambda: faults.fleet.reap(elsewhere) and
                 len(faults.effects.starts(result.run_id)) >= 2, 60, "the reaper's retry to start", interval=0.5)
    finally:
        os.kill(pool, signal.SIGCONT)
    run = faults.reap_until(lambda: run_of(faults.fleet, result.run_id).status in {"succeeded", "dead"}
                            and run_of(faults.fleet, result.run_id), 90, "the retry to finish")
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 2
    assert faults.violations() == []


def test_the_reaper_never_kills_a_process_group_it_does_not_own(faults: FaultFleet) -> None:
    """A silent run names a pgid that, by now, belongs to an unrelated process: the reaper leaves it alone."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        result = send(faults.fleet, "quick", f"reuse-{uuid.uuid4().hex}")
        faults.accepted.add(result.run_id)
        wait_status(faults.fleet, result.run_id, {"succeeded"}, timeout=60)
        services = faults.fleet.services
        with db.session(services.engine) as session:  # as if its worker died mid-run long ago
            long_ago = services.now() - timedelta(minutes=5)
            session.execute(update(Run).where(col(Run.id) == result.run_id).values(
                status=RunStatus.RUNNING, heartbeat_at=long_ago, finished_at=None, host=socket.gethostname(),
                pid=bystander.pid, pgid=bystander.pid))
            session.commit()
        faults.reap()
        assert pid_alive(bystander.pid), "the reaper killed a process group by a pid it had recorded long ago"
    finally:
        bystander.kill()
        bystander.wait()
