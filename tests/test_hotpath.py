"""What the hot path (statements built once, fleet/db.py execute) must still promise, on SQLite and PostgreSQL
with a real Redis, in-process: the audit trail in commit order for a follower, an outcome that lands on its
own attempt only, and the day's first reservations raced staying exact under both caps."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text
from sqlmodel import select

from fleet import db, executor, keys, ledger, store, sweeps
from fleet.config import AgentSpec
from fleet.dispatch import DispatchRequest, DispatchResult, dispatch
from fleet.keys import GLOBAL
from fleet.locks import Lease
from fleet.models import Run, RunStatus, SpendDay
from fleet.process import ProcessResult
from fleet.services import Services
from tests.harness import lock_waits


def _queue(services: Services, agent: str) -> DispatchResult:
    result = dispatch(services, DispatchRequest(agent, f"{agent}-{uuid.uuid4().hex}", actor="test"),
                      lambda _run_id, _fence: None)
    assert result.status == "queued", result
    return result


def _row(services: Services, run_id: str) -> Run:
    with db.session(services.engine) as session:
        run = session.get(Run, run_id)
    assert run is not None
    return run


# ---------------------------------------------------------------- the audit trail followed live


def test_a_follower_of_the_audit_trail_sees_the_created_event_of_a_dispatch_that_waited(
        services: Services) -> None:
    """`fleet events -f` follows the trail by id. A dispatch that waits on the fleet's spend row (the hot row)
    must not have its run.created event land below an id the follower has already passed: the dispatch's
    events are written at its commit, after every wait."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers are serialised (BEGIN IMMEDIATE): ids are handed out in commit order")
    _queue(services, "echo")  # today's spend rows exist
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
    blocker = services.engine.connect()
    blocker.execute(text("SELECT 1 FROM spend_days WHERE day = :day AND scope = :scope FOR UPDATE"),
                    {"day": day, "scope": GLOBAL})
    answers: list[DispatchResult] = []
    waiting = threading.Thread(target=lambda: answers.append(_queue(services, "counter")))
    try:
        waiting.start()
        deadline = time.monotonic() + 10
        while True:  # the dispatch waits on the fleet's row, its transaction open
            with services.engine.connect() as probe:
                blocked = probe.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                             "current_database() AND wait_event_type = 'Lock'")).scalar_one()
            if blocked:
                break
            assert time.monotonic() < deadline, "the dispatch never waited on the fleet's row"
            time.sleep(0.05)
        with db.session(services.engine) as session:  # any other event committed meanwhile (another dispatch)
            store.add_event(session=session, at=services.now(), kind="test.meanwhile")
            session.commit()
        with db.session(services.engine) as session:  # the follower's poll
            seen = store.events_after(session=session, after_id=0, limit=10_000)
        last = max(event.id or 0 for event in seen)
    finally:
        blocker.rollback()
        blocker.close()
        waiting.join(30)
    assert answers and answers[0].status == "queued"
    with db.session(services.engine) as session:  # the follower's next poll
        seen += store.events_after(session=session, after_id=last, limit=10_000)
        every = store.run_events(session=session, run_id=answers[0].run_id or "")
    kinds = [event.kind for event in seen if event.run_id == answers[0].run_id]
    assert [event.kind for event in every] == ["run.created", "run.queued"]
    assert kinds == ["run.created", "run.queued"], f"the follower saw only {kinds}"


# ---------------------------------------------------------------- the fenced outcome


def _failed(cost: int) -> ProcessResult:
    return ProcessResult(exit_code=1, stop_reason=None, cost_micros=cost, input_tokens=0, output_tokens=0,
                         done_reason=None, output_tail="boom\n", pid=None, pgid=None, log_bytes=5, started=True)


def _claimed(services: Services, run_id: str, fence: int) -> tuple[Run, AgentSpec, Lease]:
    """The run claimed by this message (it must be), as the executor holds it."""
    claimed = executor._claim(services, run_id, fence)
    assert not isinstance(claimed, executor.ExecuteResult), claimed
    run, spec, lease, _room = claimed
    return run, spec, lease


def _failed_once_then_claimed_again(services: Services, *, renewing: bool = False) -> tuple[
        Run, AgentSpec, Lease, ProcessResult, executor.Verdict, Run, Lease]:
    """Attempt 1 of a `fail` run fails (retryable, $0.005), its retry outcome commits but the answer is lost;
    the re-sent message claims attempt 2 on another worker (same fence). `renewing`: the old owner renewed its
    lease meanwhile (_wait_keeping). Attempt 1's run, spec, lease, result, verdict; attempt 2's run and lease."""
    queued = _queue(services, "fail")
    run, spec, lease = _claimed(services, queued.run_id or "", queued.fence or 0)
    result = _failed(cost=5_000)
    verdict = executor.judge(result, None)
    assert verdict.retryable and run.attempt == 1
    first = executor._write_outcome(services, run, spec, lease, result, verdict, True, 0.0, 5_000)
    assert first == (RunStatus.QUEUED, False, 0)  # committed; say its answer never reached the executor
    if renewing:
        services.leases.renew(lease, 60)
    run2, _spec, lease2 = _claimed(services, run.id, lease.fence)  # the re-sent message, on another worker
    assert run2.attempt == 2
    return run, spec, lease, result, verdict, run2, lease2


def test_a_retried_outcome_write_never_lands_on_the_next_attempt(services: Services) -> None:
    """Attempt 1 fails (retryable); its outcome's COMMIT reaches the database but the answer is lost, and the
    database stays away from that worker while the reaper re-sends the queued retry and another worker claims it
    (same fence: a retry keeps its fence). When the old executor's write is tried again, the fenced UPDATE
    (id, fence, running) matches attempt 2: it must not end attempt 2, book attempt 1's cost a second time or
    settle attempt 2's reservation."""
    run, spec, lease, result, verdict, _run2, _lease2 = _failed_once_then_claimed_again(services, renewing=True)
    executor._write_outcome(services, run, spec, lease, result, verdict, True, 0.0, 5_000)  # the old one's retry
    after = _row(services, run.id)
    # (status, attempt, cost booked, still reserved, settled): attempt 2 running, attempt 1's cost once,
    # attempt 2's reservation of $0.01 untouched
    assert (after.status, after.attempt, after.cost_micros, after.reserved_micros, after.settled_at) == (
        RunStatus.RUNNING, 2, 5_000, 10_000, None), "attempt 1's outcome write landed on attempt 2"


# ---------------------------------------------------------------- the day's first reservations, raced


def test_the_days_first_reservations_raced_stay_under_both_caps_exactly(engine: Engine) -> None:
    """Eight transactions of two agents reserve at once on a day with no spend rows yet (the UPDATE finds no row,
    the upsert, the second ask), agent cap 3 runs each, fleet cap 5: exactly five pass, both rows agree, no
    deadlock and no double reservation from the second ask."""
    day, now = "2031-01-01", datetime(2031, 1, 1, 12, tzinfo=UTC)  # a day no other test touches
    caps = ledger.Caps(agent=350, fleet=500)
    start = threading.Barrier(8)
    passed: list[str] = []
    errors: list[BaseException] = []

    def one(agent: str) -> None:
        try:
            start.wait(10)  # before any statement: on SQLite the first one takes the write lock
            with db.session(engine) as session:
                if ledger.reserve(session, day=day, agent=agent, amount=100, caps=caps, now=now):
                    session.commit()
                    passed.append(agent)
                else:
                    session.rollback()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(agent,)) for agent in ["a", "b"] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with db.session(engine) as session:
        rows = {row.scope: row.reserved_micros for row in session.exec(select(SpendDay).where(SpendDay.day == day))}
    assert len(passed) == 5
    assert rows == {"a": 100 * passed.count("a"), "b": 100 * passed.count("b"), GLOBAL: 500}


# ---------------------------------------------------------------- lock order: a batch that archives first


def test_a_batch_that_archives_a_stale_run_never_deadlocks_with_a_single_dispatch(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """bulk.dispatch_many promises agent rows first and the fleet's row last. A key of the batch whose run went
    stale unstarted would be archived first, and its settlement would take the fleet's row before the batch
    takes its agents' rows: a single dispatch of one of those agents that holds its agent's row and waits on
    the fleet's row would close a cycle. Such a batch goes the one-at-a-time way instead (the single dispatch,
    if the batch still reserved after archiving, is started from inside its reservation)."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers are serialised: no row locks, no deadlock")
    from fleet import bulk

    stale = _queue(services, "echo")
    with db.session(services.engine) as session:  # never started, two hours old: the batch archives it
        session.execute(text("UPDATE runs SET created_at = created_at - interval '2 hours' WHERE id = :id"),
                        {"id": stale.run_id})
        session.commit()
    work_key = _row(services, stale.run_id or "").work_key
    single: list[object] = []

    def dispatch_long() -> None:
        try:
            single.append(_queue(services, "long"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            single.append(exc)

    thread = threading.Thread(target=dispatch_long)
    real = ledger.reserve_many

    def after_a_single_dispatch(session: object, **kwargs: object) -> object:
        thread.start()  # the batch holds the fleet's row (the archive's settlement) by now
        deadline = time.monotonic() + 10
        while not lock_waits(services.engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(session, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "reserve_many", after_a_single_dispatch)
    specs = services.config.agent
    try:
        answers: object = bulk.dispatch_many(services, [(specs("echo"), work_key), (specs("long"), uuid.uuid4().hex)],
                                             lambda _run_id, _fence: None, "test")
    except Exception as exc:  # noqa: BLE001 - reported below
        answers = exc
    if thread.is_alive() or single:
        thread.join(30)
        assert not isinstance(single[0], BaseException), f"the single dispatch failed: {single[0]!r}"
    assert not isinstance(answers, Exception), f"the batch failed: {answers!r}"
    assert isinstance(answers, list) and [a.status for a in answers] == ["duplicate", "queued"], answers
    assert answers[0].archived == [stale.run_id] and _row(services, stale.run_id or "").status == RunStatus.ARCHIVED


# ---------------------------------------------------------------- the outcome after the reaper took over


def _reaper_takes_over(services: Services, run_id: str) -> list[tuple[str, int]]:
    """The reaper finds the running attempt silent (heartbeat old, lease lapsed a whole TTL ago) and takes it
    over: abandoned, then requeued (attempt < max) or dead-lettered (attempt == max). The messages it sent."""
    with db.session(services.engine) as session:
        row = session.get(Run, run_id)
        assert row is not None and row.heartbeat_at is not None
        row.heartbeat_at = row.heartbeat_at - timedelta(hours=1)
        session.add(row)
        session.commit()
        fence, slot, agent = row.fence, row.slot, row.agent
    assert slot is not None
    services.redis.delete(keys.slot_lease(agent, slot))  # the owner's lease lapsed (cut off from Redis)
    seconds, _ = services.redis.time()
    services.redis.set(keys.suspect(run_id), f"{fence}:{int(seconds) - 3600}")  # seen lapsed long ago
    sent: list[tuple[str, int]] = []
    sweeps.reap(services, lambda rid, f: sent.append((rid, f)))
    return sent


def test_an_outcome_that_finds_the_reaper_requeued_its_attempt_is_stale_and_books_its_spend(
        services: Services) -> None:
    """Attempt 1's owner is cut off; the reaper abandons the attempt (booking its reservation) and requeues it
    with a new fence, writing `run.retrying` with attempt 1. The old owner comes back and writes its
    retryable outcome: the run is not its own any more, and the reaper's event of the same kind and attempt
    must not pass for the owner's own earlier commit (its spend would go unbooked, its requeue be sent)."""
    queued = _queue(services, "fail")
    run, spec, lease = _claimed(services, queued.run_id or "", queued.fence or 0)
    sent = _reaper_takes_over(services, run.id)
    taken = _row(services, run.id)
    assert (taken.status, taken.attempt, len(sent)) == (RunStatus.QUEUED, 1, 1) and taken.fence != lease.fence
    requeued: list[tuple[str, int, float]] = []
    result = _failed(cost=50_000)  # it spent $0.05, none of it booked while cut off (charged = 0)
    verdict = executor.judge(result, None)
    answer = executor._finish(services, run, spec, lease, result, verdict,
                              lambda rid, f, d: requeued.append((rid, f, d)), 50_000, 0)
    after = _row(services, run.id)
    # (answer, messages with the dead fence, cost booked: the $0.05 spent, in place of the reaper's $0.01 stand-in)
    assert (answer.status, requeued, after.cost_micros) == ("stale", [], 50_000), (
        f"answered {answer.status}, requeued {requeued}, booked {after.cost_micros}")


def test_a_last_attempt_the_reaper_dead_lettered_is_not_taken_for_the_owners_own_outcome(
        services: Services) -> None:
    """The same on the last attempt: the reaper buries attempt 2 keeping its fence, so the row reads
    (fence, 2, dead), exactly what the cut-off owner meant to write; the row alone must not pass for the
    owner's own commit (its spend would go unbooked and a second dead-letter alert go out)."""
    _run, spec, _lease, _result, verdict, run2, lease2 = _failed_once_then_claimed_again(services)
    _reaper_takes_over(services, run2.id)
    assert _row(services, run2.id).status == RunStatus.DEAD
    answer = executor._finish(services, run2, spec, lease2, _failed(cost=50_000), verdict,
                              lambda *_: None, 50_000, 0)
    after = _row(services, run2.id)
    # attempt 1's $0.005, and attempt 2's $0.05 reported in place of the reaper's $0.01 stand-in for it
    assert (answer.status, after.cost_micros) == ("stale", 5_000 + 50_000), (
        f"answered {answer.status}, booked {after.cost_micros}")


def test_a_late_outcome_recognised_by_its_event_does_not_take_the_slot_of_a_finished_run_again(
        services: Services) -> None:
    """Attempt 1's outcome committed (answer lost), the retry ran on another worker and finished (its lease
    freed). The old owner's write again is recognised by its event: nothing is booked twice, and nothing of what
    follows a fresh write (a lease renewal that would take the finished run's slot again, a requeue) is done."""
    from dataclasses import replace

    run, spec, lease, failed, verdict, run2, lease2 = _failed_once_then_claimed_again(services)
    ok = replace(failed, exit_code=0, cost_micros=1_000)
    done = executor._finish(services, run2, spec, lease2, ok, executor.judge(ok, None), lambda *_: None, 1_000, 0)
    assert done.status == "succeeded"
    assert services.leases.holders("fail", spec.concurrency) == []
    requeued: list[tuple[str, int, float]] = []
    late = executor._finish(services, run, spec, lease, failed, verdict,
                            lambda rid, f, d: requeued.append((rid, f, d)), 5_000, 5_000)
    assert _row(services, run.id).cost_micros == 6_000  # nothing booked twice (the fix's point)
    assert (services.leases.holders("fail", spec.concurrency), requeued) == ([], []), (
        f"late write ({late.status}) took the finished run's slot again and requeued it")


# ---------------------------------------------------------------- the dispatch's events at commit


def test_a_dispatch_whose_event_cannot_be_written_keeps_no_slot(services: Services) -> None:
    """The run.created event's actor is cut to its column as the run's is: on PostgreSQL a longer one failed
    the event's INSERT at the commit (events_at_commit), after the admission took a lease, and the slot stayed
    taken with no run behind it."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    from fleet.dispatch import DispatchRequest, dispatch

    result = dispatch(services, DispatchRequest("echo", "k-long-actor", actor="celery:" + "h" * 300),
                      lambda _r, _f: None)
    assert result.status == "queued"
    with db.session(services.engine) as session:
        events = store.run_events(session=session, run_id=result.run_id or "")
    assert [e.kind for e in events] == ["run.created", "run.queued"] and len(events[0].actor or "") == 255


# ---------------------------------------------------------------- the live slots a dispatch reads before its admission


def test_a_superseded_queued_run_hands_its_slot_to_the_run_that_replaces_it(services: Services) -> None:
    """A queued run the dispatch archives (superseded: another key for the same work) no longer holds its slot
    by the database's live slots, which the dispatch reads after archiving: its successor takes that slot even
    when Redis lost the leases (a restart) and only the database tells which slots are held."""
    spec = services.config.agent("echo")
    held = dispatch(services, DispatchRequest("echo", "unit", actor="test"), lambda _run_id, _fence: None)
    assert held.status == "queued"
    with db.session(services.engine) as session:  # its key renamed, as a hand edit or an old release does
        session.execute(text("UPDATE runs SET idem_key = 'echo:unit:old' WHERE id = :id"), {"id": held.run_id})
        session.commit()
    services.redis.flushdb()  # the leases went with a Redis restart: only the database knows slot 1 is held
    assert spec.concurrency == 1
    again = dispatch(services, DispatchRequest("echo", "unit", actor="test"), lambda _run_id, _fence: None)
    assert (again.status, again.archived) == ("queued", [held.run_id]), again
    assert _row(services, held.run_id or "").status == RunStatus.ARCHIVED


def test_a_dispatch_that_waits_while_it_archives_still_sees_the_slot_a_run_took_meanwhile(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots the database says live runs hold are what keeps two runs off one slot after Redis lost its leases
    (a restart). A dispatch that archives a superseded run (its key renamed, as in the test above) waits on its
    agent's spend row while another dispatch of the agent holds it; that one commits its run on slot 0, then Redis
    restarts. The waiting dispatch must count slot 0 as taken when it is admitted: read before the wait, the slots
    miss it and both runs hold slot 0."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers are serialised (BEGIN IMMEDIATE): no dispatch waits inside another's")
    from sqlalchemy import event

    def queue(work_key: str) -> DispatchResult:
        result = dispatch(services, DispatchRequest("long", work_key, actor="test"), lambda _run_id, _fence: None)
        assert result.status == "queued", result
        return result

    first = queue("x")  # slot 0
    stale = queue("u1")  # slot 1
    with db.session(services.engine) as session:  # the first ends (slot 0 free); the second is superseded
        session.execute(text("UPDATE runs SET status = 'succeeded', finished_at = now() WHERE id = :id"),
                        {"id": first.run_id})
        session.execute(text("UPDATE runs SET idem_key = 'long:u1:old' WHERE id = :id"), {"id": stale.run_id})
        session.commit()
    services.leases.release(Lease("long", 0, first.run_id or "", first.fence or 0))
    assert _row(services, stale.run_id or "").slot == 1

    holding, let_go, committed = threading.Event(), threading.Event(), threading.Event()
    threads: dict[str, int] = {}
    answers: dict[str, object] = {}

    def before_commit(_session: object) -> None:  # the other dispatch, its rows locked, not committed yet
        if threading.get_ident() == threads.get("other"):
            holding.set()
            assert let_go.wait(20), "never let go"

    real_admit = services.admissions.admit

    def admit(*args: object, **kwargs: object) -> object:
        if threading.get_ident() == threads.get("waiting"):
            assert committed.wait(20), "the other dispatch never committed"
            services.redis.flushdb()  # Redis restarts: the leases are gone, only the database knows the slots
        return real_admit(*args, **kwargs)  # type: ignore[arg-type]

    def run(name: str, work_key: str) -> None:
        threads[name] = threading.get_ident()
        try:
            answers[name] = queue(work_key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            answers[name] = exc
        finally:
            if name == "other":
                committed.set()

    monkeypatch.setattr(services.admissions, "admit", admit)
    event.listen(db.Session, "before_commit", before_commit)
    other = threading.Thread(target=run, args=("other", "u2"))
    waiting = threading.Thread(target=run, args=("waiting", "u1"))
    try:
        other.start()
        assert holding.wait(20), "the other dispatch never reached its commit"
        waiting.start()
        deadline = time.monotonic() + 20
        while not lock_waits(services.engine):  # the archiving dispatch waits on the agent's spend row
            assert time.monotonic() < deadline and waiting.is_alive(), "the archiving dispatch never waited"
            time.sleep(0.02)
        let_go.set()
        other.join(30)
        waiting.join(30)
    finally:
        let_go.set()
        committed.set()
        event.remove(db.Session, "before_commit", before_commit)
    assert not other.is_alive() and not waiting.is_alive()
    took, again = answers["other"], answers["waiting"]
    assert isinstance(took, DispatchResult) and isinstance(again, DispatchResult), answers
    assert again.archived == [stale.run_id]
    slots = {name: _row(services, result.run_id or "").slot for name, result in (("other", took), ("waiting", again))}
    assert slots["other"] == 0
    assert slots["waiting"] != slots["other"], f"two live runs hold one slot: {slots}"
