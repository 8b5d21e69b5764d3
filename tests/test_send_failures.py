"""A send that raised after its message got through: a worker may already hold the run. The dispatcher must
neither undo what runs (its lease, its reservation, its count) nor tell the caller nothing was kept."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
from sqlmodel import select

from fleet import db, executor, ledger
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import Run, RunStatus, SpendDay
from fleet.services import Services


def _row(services: Services, run_id: str) -> Run:
    with db.session(services.engine) as session:
        run = session.get(Run, run_id)
    assert run is not None
    return run


def test_a_send_that_raised_after_a_worker_claimed_the_run_answers_it_queued(services: Services) -> None:
    """The publish reached the broker, its answer did not, and a worker claimed the run meanwhile: the caller
    hears that the run is queued (it runs), the running run keeps its lease, and a retry with a fresh key
    (`fleet dispatch capped` without --key) is not invited. It used to hear 75, "nothing was kept", and the
    running run's lease was released."""
    claimed: list[Any] = []

    def delivered_then_raised(run_id: str, fence: int) -> None:
        claimed.append(executor._claim(services, run_id, fence))  # the worker was quicker than the answer
        raise ConnectionError("Error while reading from socket: timed out")

    answer = dispatch(services, DispatchRequest("capped", None, actor="cli"), delivered_then_raised)
    run = claimed[0][0]
    assert answer.status == "queued" and answer.run_id == run.id, answer
    assert _row(services, run.id).status == RunStatus.RUNNING
    assert services.leases.holder("capped", run.slot) is not None, "unsend released a running run's lease"


def test_unsend_racing_a_claim_never_hands_back_a_running_runs_reservation(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: unsend read the run queued, then a worker's claim committed, then unsend settled it: the
    running run's reservation went back to the day and its count was undone, and the cap admitted one run more
    than it allows ($5 cap, $1 each: six). Unsend now takes the row's lock before it reads it."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's BEGIN IMMEDIATE serialises unsend and the claim")
    real_settle = ledger.settle
    state: dict[str, Any] = {}

    def a_claim_first(session: Any, *, run: Run, now: Any, current: Any = None) -> bool:
        if "raced" not in state:  # the worker's claim comes in between unsend's read and its settle
            state["raced"] = True
            worker = threading.Thread(target=lambda: state.setdefault(
                "claim", executor._claim(services, run.id, run.fence or 0)))
            worker.start()
            worker.join(timeout=3)  # with the row locked by unsend, the claim waits: it cannot come first
        return real_settle(session, run=run, now=now, current=current)

    def delivered_then_raised(_run_id: str, _fence: int) -> None:
        raise ConnectionError("Error while reading from socket: timed out")

    monkeypatch.setattr(ledger, "settle", a_claim_first)
    with contextlib.suppress(Exception):  # the answer is not what this test is about
        dispatch(services, DispatchRequest("capped", "first", actor="test"), delivered_then_raised)
    monkeypatch.setattr(ledger, "settle", real_settle)
    others = [dispatch(services, DispatchRequest("capped", f"more-{i}", actor="test"), lambda *_: None).status
              for i in range(5)]
    with db.session(services.engine) as session:
        runs = session.exec(select(Run).where(Run.agent == "capped")).all()
        day = session.exec(select(SpendDay).where(SpendDay.scope == "capped")).one()
    live = [r for r in runs if r.status in {RunStatus.QUEUED, RunStatus.RUNNING}]
    assert len(live) <= 5, (f"{len(live)} runs of $1.00 live under a $5.00 cap ({others}); the day reserves "
                            f"{day.reserved_micros} for {day.runs} run(s)")
    assert sum(r.reserved_micros for r in live) == day.reserved_micros


def test_an_unexpected_error_inside_the_dispatch_gives_its_slot_back(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything raised between the admission (which took the slot's lease) and the commit rolls the run back and
    gives the slot back at once: a new user's huge cost estimate raised OverflowError at the reservation, and the
    lease stayed held for a queued lease's TTL, refusing the agent with a run that does not exist."""
    def overflow(*_args: Any, **_kwargs: Any) -> bool:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(ledger, "reserve_counted", overflow)
    with pytest.raises(OverflowError):
        dispatch(services, DispatchRequest("echo", "first", actor="test"), lambda *_: None)
    monkeypatch.undo()
    assert services.leases.holders("echo", 1) == []
    assert dispatch(services, DispatchRequest("echo", "second", actor="test"), lambda *_: None).status == "queued"


def test_a_keyless_dispatch_whose_commit_answer_was_lost_names_the_key_to_retry_with(services: Services) -> None:
    """Found by review: the dispatch's COMMIT reached the database but its answer was lost (a connection dropped
    at the commit): the run stands queued (the reaper sends it), yet the caller heard 75 "nothing was written;
    safe to retry". For a dispatch without --key that advice makes a second run: its retry mints a fresh key.
    The answer must say the run may have been accepted, and name the key whose retry is a duplicate if it was."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from fleet.errors import UnavailableError

    lost = [1]

    def answer_lost(_session: Any) -> None:
        if lost[0]:
            lost[0] -= 1
            raise OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))

    event.listen(db.Session, "after_commit", answer_lost)
    try:
        with pytest.raises(UnavailableError) as raised:
            dispatch(services, DispatchRequest("echo", actor="test"), lambda *_: None)
    finally:
        event.remove(db.Session, "after_commit", answer_lost)
    with db.session(services.engine) as session:
        (landed,) = session.exec(select(Run).where(Run.agent == "echo")).all()
    said = str(raised.value)
    assert landed.status == RunStatus.QUEUED and "safe to retry" not in said and landed.work_key in said, said
    again = dispatch(services, DispatchRequest("echo", landed.work_key, actor="test"), lambda *_: None)
    assert (again.status, again.run_id) == ("duplicate", landed.id), again
