"""The claim's commit under a database blip, and a kill landing between the claim and the agent's start, on
SQLite and PostgreSQL with a real Redis, in-process. Found by review; each test failed on the code before its fix."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from fleet import db, executor
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import Run, RunStatus
from fleet.services import Services


def _queued(services: Services, agent: str) -> tuple[str, int]:
    queued = dispatch(services, DispatchRequest(agent, uuid.uuid4().hex, actor="test"), lambda *_: None)
    assert queued.status == "queued", queued
    return queued.run_id or "", queued.fence or 0


def _row(services: Services, run_id: str) -> Run:
    with db.session(services.engine) as session:
        run = session.get(Run, run_id)
    assert run is not None
    return run


@contextmanager
def _first_commit_fails(when: str) -> Iterator[list[int]]:
    """The next commit of any session raises once: `after_commit`, its COMMIT applied and the answer lost;
    `before_commit`, the transaction never committed."""
    left = [1]

    def fail(_session: Any) -> None:
        if left[0]:
            left[0] -= 1
            raise OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))

    event.listen(db.Session, when, fail)
    try:
        yield left
    finally:
        event.remove(db.Session, when, fail)


def _execute(services: Services, run_id: str, fence: int) -> tuple[executor.ExecuteResult, list[tuple[Any, ...]]]:
    sent: list[tuple[Any, ...]] = []
    requeue: Callable[..., None] = lambda *message: sent.append(message)  # noqa: E731
    return executor.execute(services, run_id, fence, requeue), sent


def test_a_claim_whose_commit_answer_was_lost_runs_its_attempt(services: Services) -> None:
    """The claim's COMMIT landed and its answer was lost: the executor finds its claim again (by its event) and
    runs the attempt. It used to fail the task with nothing launched, the run left running with nobody behind
    it, until the reaper took it over, booked its reservation as spent and used up its one retry on the blip."""
    run_id, fence = _queued(services, "echo")
    with _first_commit_fails("after_commit") as left:
        ended, _ = _execute(services, run_id, fence)
    assert left == [0]
    run = _row(services, run_id)
    assert (ended.status, run.status, run.attempt) == ("succeeded", RunStatus.SUCCEEDED, 1), (ended, run.status)


def test_a_claim_whose_commit_never_landed_is_deferred_and_claimed_again(services: Services) -> None:
    """The claim's transaction never committed: nothing started, the run is still queued under its fence, and
    the execute is deferred (sent again shortly), so the next delivery claims and runs it."""
    run_id, fence = _queued(services, "echo")
    with _first_commit_fails("before_commit") as left:
        first, _ = _execute(services, run_id, fence)
    assert left == [0] and first.status == "deferred", first
    assert _row(services, run_id).status == RunStatus.QUEUED
    again, _ = _execute(services, run_id, fence)
    assert again.status == "succeeded" and _row(services, run_id).attempt == 1, again
