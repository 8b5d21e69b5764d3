"""The dead-letter queue in-process, on a real Redis and SQLite / PostgreSQL: a replay runs a dead letter's work
once, whatever ids the database hands out."""

from __future__ import annotations

import uuid

from sqlmodel import select

from fleet import db, dlq, executor
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import DeadLetter
from fleet.services import Services


def _dead_lettered(services: Services, key: str) -> str:
    """A run of the failing agent, through its one retry, to its dead letter."""
    queued = dispatch(services, DispatchRequest("fail", key, actor="test"), lambda *_: None)
    assert queued.status == "queued", queued
    requeued: list[tuple[str, int, float]] = []
    first = executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *m: requeued.append(m))
    assert first.status == "queued" and requeued, first
    second = executor.execute(services, requeued[0][0], requeued[0][1], lambda *_: None)
    assert second.status == "dead", second
    return queued.run_id or ""


def test_a_dead_letter_that_reuses_a_purged_ones_id_is_replayed(services: Services) -> None:
    """SQLite hands a purged dead letter's id out again (INTEGER PRIMARY KEY without AUTOINCREMENT), and a replay
    was keyed by that id: job B's dead letter, id 1 like job A's purged one, replayed as a `duplicate` of A's
    replay, marked replayed, and job B never ran again (found by review). The key is the dead run's own id now."""
    _dead_lettered(services, f"job-a-{uuid.uuid4().hex}")
    with db.session(services.engine) as session:
        first = session.exec(select(DeadLetter)).one()
    replay_a = dlq.replay(services, first.id or 0, lambda *_: None, actor="operator")
    assert replay_a.status == "queued"
    requeued: list[tuple[str, int, float]] = []  # the replay runs, and fails again: the fix was elsewhere
    executor.execute(services, replay_a.run_id or "", replay_a.fence or 0, lambda *m: requeued.append(m))
    executor.execute(services, requeued[0][0], requeued[0][1], lambda *_: None)
    dlq.purge(services, None, actor="operator")  # the operator clears the queue
    run_b = _dead_lettered(services, f"job-b-{uuid.uuid4().hex}")
    with db.session(services.engine) as session:
        second = session.exec(select(DeadLetter).where(DeadLetter.run_id == run_b)).one()
    replay_b = dlq.replay(services, second.id or 0, lambda *_: None, actor="operator")
    assert replay_b.status == "queued" and replay_b.run_id != replay_a.run_id, (second.id, first.id, replay_b)
    again = dlq.replay(services, second.id or 0, lambda *_: None, actor="operator")
    assert (again.status, again.run_id) == ("duplicate", replay_b.run_id)  # still once per dead letter


def test_a_purged_dead_letters_id_is_never_handed_out_again(services: Services) -> None:
    """A dead letter's id is what the operator acts by: `fleet dlq replay ID`, `purge ID`, and the page's Replay and
    Purge buttons (a phone's tab from last night still holds them, its CSRF token valid for 12 h). SQLite handed a
    purged id out again (INTEGER PRIMARY KEY without AUTOINCREMENT): after `fleet dlq purge --all` the next dead
    letter was id 1 again, so an id read before the purge replayed or purged another agent's run."""
    _dead_lettered(services, f"job-a-{uuid.uuid4().hex}")
    with db.session(services.engine) as session:
        first = session.exec(select(DeadLetter)).one()
    assert dlq.purge(services, None, actor="operator") == 1
    run_b = _dead_lettered(services, f"job-b-{uuid.uuid4().hex}")
    with db.session(services.engine) as session:
        second = session.exec(select(DeadLetter).where(DeadLetter.run_id == run_b)).one()
    assert (second.id or 0) > (first.id or 0), (first.id, second.id)


def test_a_dead_letter_replayed_once_is_not_replayed_again_after_its_replays_key_is_released(
        services: Services) -> None:
    """A dead letter is replayed once (the module's promise, and the page hides its button once it is): a second
    `fleet dlq replay` answers with the first replay. Its key was the only guard, and the idempotency sweep frees
    every finished run's key after idempotency_ttl_s: a week later the same replay ran the dead job again."""
    from dataclasses import replace
    from datetime import timedelta

    from fleet import sweeps

    dead_run = _dead_lettered(services, f"job-{uuid.uuid4().hex}")
    with db.session(services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == dead_run)).one()
    first = dlq.replay(services, dead.id or 0, lambda *_: None, actor="operator")
    assert first.status == "queued", first
    requeued: list[tuple[str, int, float]] = []
    executor.execute(services, first.run_id or "", first.fence or 0, lambda *m: requeued.append(m))
    executor.execute(services, requeued[0][0], requeued[0][1], lambda *_: None)  # the replay ran, to its end
    later = services.now() + timedelta(seconds=services.config.fleet.idempotency_ttl_s + 60)
    week_on = replace(services, now=lambda: later)
    assert first.run_id in sweeps.release_keys(week_on).runs  # its key is free for new work now
    sent: list[tuple[str, int]] = []
    again = dlq.replay(week_on, dead.id or 0, lambda *m: sent.append(m), actor="operator")
    assert (again.status, again.run_id, sent) == ("duplicate", first.run_id, []), again
