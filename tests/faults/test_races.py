"""Writes that decide ownership, interleaved the way two processes can interleave them: every one of
them is conditional, and a loser changes nothing (the database is the final guard)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from fleet import db, executor, store, sweeps
from fleet import dispatch as dispatching
from fleet.dispatch import DispatchRequest
from fleet.errors import UnavailableError
from fleet.models import Run, RunStatus, SpendDay
from tests.faults.conftest import FaultFleet, fault_fleet
from tests.faults.servers import PrivateCluster
from tests.test_dispatch import run_of

pytestmark = [pytest.mark.faults]


@pytest.fixture
def idle(kind: str, tmp_path: Path, pg_cluster: PrivateCluster | None) -> Iterator[FaultFleet]:
    """A fault fleet's database and Redis, no worker."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        yield faults


def _queued(faults: FaultFleet, agent: str = "quick") -> Run:
    sent: list[tuple[str, int]] = []
    result = dispatching.dispatch(faults.fleet.services, DispatchRequest(agent, uuid.uuid4().hex, actor="test"),
                                  lambda run_id, fence: sent.append((run_id, fence)))
    assert result.status == "queued" and len(sent) == 1
    return run_of(faults.fleet, result.run_id)


def _reserved(faults: FaultFleet, scope: str) -> int:
    with db.session(faults.fleet.services.engine) as session:
        return sum(row.reserved_micros for row in session.exec(select(SpendDay).where(SpendDay.scope == scope)))


def test_two_reapers_requeueing_one_run_keep_its_slot(idle: FaultFleet) -> None:
    """Both reapers saw the run abandoned; the second one's failed move must not free the first one's lease."""
    services = idle.fleet.services
    run = _queued(idle)
    with db.session(services.engine) as session:
        session.execute(update(Run).where(col(Run.id) == run.id).values(status=RunStatus.ABANDONED, attempt=1))
        session.commit()
    seen_by_both = run_of(idle.fleet, run.id)
    sent: list[tuple[str, int]] = []
    sweeps._requeue_or_bury(services, seen_by_both, lambda r, f: sent.append((r, f)), sweeps.SweepReport("a"))
    sweeps._requeue_or_bury(services, seen_by_both, lambda r, f: sent.append((r, f)), sweeps.SweepReport("b"))
    requeued = run_of(idle.fleet, run.id)
    assert requeued.status == RunStatus.QUEUED and len(sent) == 1
    holders = services.leases.holders("quick", 100)
    assert [(h.run_id, h.fence) for h in holders] == [(run.id, requeued.fence)], "the loser freed the winner's slot"


def test_an_archived_run_cannot_be_queued_back_to_life(idle: FaultFleet) -> None:
    """The row is ended between its creation and the queue step (in one transaction now, so only a bug could
    do it): the queue step's conditional update changes nothing, and the lease and the money go back."""
    services = idle.fleet.services
    spec = services.config.agent("quick")
    work_key = uuid.uuid4().hex
    request = DispatchRequest("quick", work_key, actor="test")
    with db.session(services.engine) as session:
        now = services.now()
        run = dispatching.create(session, spec, work_key, f"quick:{work_key}", None, request, now)
        assert isinstance(run, Run)
        assert dispatching.archive(session, services, run, reason="superseded")
        with pytest.raises(UnavailableError):
            dispatching.dispatch_one(session, services, spec, run, now)
        session.commit()
    assert run_of(idle.fleet, run.id).status == RunStatus.ARCHIVED
    assert _reserved(idle, "quick") == 0, "the archived run kept a reservation nobody will return"
    assert services.leases.holders("quick", 100) == []


def test_a_losing_duplicate_delivery_leaves_the_running_run_alone(idle: FaultFleet) -> None:
    """A second delivery read the run while it was queued and is then told to end it: the run is running by now,
    so the loser must neither settle its reservation nor free its lease."""
    services = idle.fleet.services
    run = _queued(idle)
    stale_copy = run_of(idle.fleet, run.id)
    claimed = executor._claim(services, run.id, run.fence or 0)
    assert not isinstance(claimed, executor.ExecuteResult)
    reserved_before = _reserved(idle, "quick")
    with db.session(services.engine) as session:
        executor._end_unstarted(services, session, stale_copy, RunStatus.KILLED, "killed while queued")
    after = run_of(idle.fleet, run.id)
    assert after.status == RunStatus.RUNNING and after.settled_at is None
    assert _reserved(idle, "quick") == reserved_before > 0
    assert [h.run_id for h in services.leases.holders("quick", 100)] == [run.id]
    with db.session(services.engine) as session:
        kinds = [e.kind for e in store.run_events(session=session, run_id=run.id)]
    assert "run.killed" not in kinds


def test_a_retry_after_midnight_reserves_on_the_new_day(idle: FaultFleet) -> None:
    """Issue 10 item 1: the first attempt reserved yesterday; its retry, claimed today, gives yesterday's leftover
    back and reserves on today's budget day."""
    services = idle.fleet.services
    run = _queued(idle)
    yesterday = "2000-01-01"
    with db.session(services.engine) as session:
        today = run.budget_day
        session.execute(update(Run).where(col(Run.id) == run.id).values(budget_day=yesterday, attempt=1))
        session.execute(update(SpendDay).where(col(SpendDay.day) == today).values(reserved_micros=0))
        for scope in ("quick", "*"):
            session.add(SpendDay(day=yesterday, scope=scope, reserved_micros=run.reserved_micros, spent_micros=0,
                                 updated_at=services.now()))
        session.commit()
    claimed = executor._claim(services, run.id, run.fence or 0)
    assert not isinstance(claimed, executor.ExecuteResult), claimed
    after = run_of(idle.fleet, run.id)
    assert after.budget_day == today and after.attempt == 2 and after.reserved_micros == 10_000
    with db.session(services.engine) as session:
        rows = {(r.day, r.scope): r.reserved_micros for r in session.exec(select(SpendDay))}
    assert rows[(yesterday, "quick")] == rows[(yesterday, "*")] == 0
    assert rows[(today, "quick")] == rows[(today, "*")] == 10_000
