"""The claim's commit under a database blip, and a kill landing between the claim and the agent's start, on
SQLite and PostgreSQL with a real Redis, in-process. Found by review; each test failed on the code before its fix."""

from __future__ import annotations

import dataclasses
import sqlite3
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


def test_a_kill_landing_after_the_claim_starts_no_agent(services: Services, monkeypatch: Any, tmp_path: Any) -> None:
    """`fleet kill` returns (the flag in Redis and mirrored) between the claim's commit and the agent's spawn: the
    agent never starts and the run ends killed. It used to be spawned and run its side effect, stopped only by
    the first watch poll, if it was still running then."""
    from fleet import killswitch

    real_claim = executor._claim

    def kill_lands_after_the_claim(*args: Any) -> Any:
        got = real_claim(*args)
        killswitch.engage(services.engine, services.redis, scope="*", reason="stop everything", actor="operator",
                          hard=False, now=services.now()).confirm()
        return got

    run_id, fence = _queued(services, "counter")
    monkeypatch.setattr(executor, "_claim", kill_lands_after_the_claim)
    ended, _ = _execute(services, run_id, fence)
    monkeypatch.undo()
    marks = tmp_path / "counter.txt"
    assert not marks.exists() or not marks.read_text(), f"the agent ran after the kill: {marks.read_text()}"
    assert ended.status == "killed" and _row(services, run_id).status == RunStatus.KILLED, ended


def test_a_kill_redis_lost_stops_a_claim_by_its_mirror(services: Services) -> None:
    """A kill whose flag Redis lost (a restart without persistence) is still in force by the mirror the claim
    reads, for every scope it names: the queued run ends killed, nothing starts, and the flag is put back; a
    kill of another agent leaves the run to start."""
    from datetime import UTC, datetime

    from fleet import keys, killswitch

    for scope, stops in (("other", False), ("echo", True), ("*", True)):
        run_id, fence = _queued(services, "echo")
        killswitch.engage(services.engine, services.redis, scope=scope, reason="test", actor="test", hard=False,
                          now=datetime.now(UTC))
        services.redis.delete(keys.kill(scope))
        result, _sent = _execute(services, run_id, fence)
        assert (result.status == "killed") == stops, (scope, result)
        assert (_row(services, run_id).started_at is None) == stops
        assert (services.redis.exists(keys.kill(scope)) == 1) == stops  # put back from the mirror
        killswitch.release(services.engine, services.redis, scope=scope, actor="test", now=datetime.now(UTC))


def test_a_kill_only_the_mirror_holds_landing_during_the_claims_redis_round_trip_stops_it(
        services: Services, monkeypatch: Any, tmp_path: Any, closed_port: int) -> None:
    """`fleet kill` cannot reach Redis (the kill is in the mirror only: "running agents stop at their next mirror
    check") and commits while a claim is asking Redis for its flags and lease. Redis has no flag, so only the
    mirror can stop the claim, and it is read for that after the Redis answer: the run ends killed, no agent
    starts. Read before the round trip, the mirror misses the kill and the agent runs."""
    import pytest
    import redis as redis_lib

    from fleet import killswitch

    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write lock (BEGIN IMMEDIATE) holds the kill's mirror write until the claim ends")
    unreachable = redis_lib.Redis(host="127.0.0.1", port=closed_port, socket_connect_timeout=1)
    real_claim = services.admissions.claim

    def kill_lands_while_asking_redis(*args: Any, **kwargs: Any) -> Any:
        engaged = killswitch.engage(services.engine, unreachable, scope="counter", reason="stop", actor="operator",
                                    hard=False, now=services.now())
        assert engaged.mirrored and not engaged.in_redis, engaged
        return real_claim(*args, **kwargs)

    run_id, fence = _queued(services, "counter")
    monkeypatch.setattr(services.admissions, "claim", kill_lands_while_asking_redis)
    ended, _ = _execute(services, run_id, fence)
    monkeypatch.undo()
    killswitch.release(services.engine, services.redis, scope="counter", actor="test", now=services.now())
    marks = tmp_path / "counter.txt"
    assert not marks.exists() or not marks.read_text(), f"the agent ran after the kill: {marks.read_text()}"
    assert ended.status == "killed" and _row(services, run_id).status == RunStatus.KILLED, ended


def test_a_claim_the_database_cannot_take_yet_is_deferred_not_failed(services: Services) -> None:
    """The database cannot serve the claim yet (SQLite: another writer holds the lock past the busy timeout, as a
    loaded CI once did; PostgreSQL: the server stalls): nothing has started, so the execute is deferred and sent
    again shortly. It used to raise out of the task, whose message was then acknowledged as failed: the run stayed
    queued with no message until the reaper's resend window (5 minutes) had passed."""
    run_id, fence = _queued(services, "echo")
    if services.engine.dialect.name == "sqlite":
        hurried = dataclasses.replace(services, engine=db.make_engine(str(services.engine.url), timeout_s=0.2))
        holder = sqlite3.connect(str(services.engine.url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # a real writer holding the lock
        try:
            first, _ = _execute(hurried, run_id, fence)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            hurried.engine.dispose()
    else:
        with _first_statement_fails():
            first, _ = _execute(services, run_id, fence)
    assert first.status == "deferred", first
    assert _row(services, run_id).status == RunStatus.QUEUED
    again, _ = _execute(services, run_id, fence)
    assert again.status == "succeeded" and _row(services, run_id).attempt == 1, again


@contextmanager
def _first_statement_fails() -> Iterator[None]:
    """The next statement of any engine raises as a stalled server's would (the connection timed out)."""
    from sqlalchemy import Engine

    left = [1]

    def fail(*_args: Any) -> None:
        if left[0]:
            left[0] -= 1
            raise OperationalError("SELECT", None, Exception("connection timeout expired"))

    event.listen(Engine, "before_cursor_execute", fail)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", fail)
