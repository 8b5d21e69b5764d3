"""What an attempt's end must keep through a Redis or database blip at the wrong moment, on SQLite and PostgreSQL
with a real Redis, in-process: the agent's own pause (exit 78) and the spend of an attempt that lost its run.
Found by review; each test failed on the code before its fix."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlmodel import select
from structlog.testing import capture_logs

from fleet import db, executor, pause
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import Pause, Run, SpendDay
from fleet.process import ProcessResult
from fleet.services import Services
from fleet.watch import Bookkeeper, Ownership, book_lost_spend
from tests.harness import wait_for


def _claimed(services: Services, agent: str) -> tuple[Run, Any, Any]:
    queued = dispatch(services, DispatchRequest(agent, uuid.uuid4().hex, actor="test"), lambda *_: None)
    assert queued.status == "queued", queued
    claimed = executor._claim(services, queued.run_id or "", queued.fence or 0)
    assert not isinstance(claimed, executor.ExecuteResult), claimed
    run, spec, lease, _room = claimed
    return run, spec, lease


def _exited(code: int, cost: int = 0) -> ProcessResult:
    return ProcessResult(exit_code=code, stop_reason=None, cost_micros=cost, input_tokens=0, output_tokens=0,
                         done_reason=None, output_tail="", pid=None, pgid=None, log_bytes=0, started=True)


def _row(services: Services, run_id: str) -> Run:
    with db.session(services.engine) as session:
        run = session.get(Run, run_id)
    assert run is not None
    return run


def _redis_restarting(*_args: Any, **_kwargs: Any) -> None:
    raise redis_lib.ConnectionError("Redis is restarting")


# ---------------------------------------------------------------- exit 78: the agent's own pause


def test_a_config_dead_letter_pauses_its_agent_through_a_redis_blip_after_its_outcome(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 78 dead-letters the run `config` and pauses its agent. The pause came after the outcome's commit, in
    the same try as the lease's release: a Redis error there and the pause was never tried, and nothing else
    ever pauses the agent (it is scheduled again and again). The pause is now part of the outcome."""
    run, spec, lease = _claimed(services, "exit78")
    result = _exited(executor.EXIT_CONFIG)
    monkeypatch.setattr(services.admissions, "finish", _redis_restarting)
    ended = executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None, 0, 0)
    assert ended.status == "dead"
    with db.session(services.engine) as session:
        row = session.get(Pause, "exit78")
    assert row is not None and row.engaged, "dead-lettered config, but the agent was never paused"


def test_a_config_dead_letters_pause_is_durable_through_a_database_blip_after_its_outcome(
        services: Services) -> None:
    """The pause's mirror had a write of its own after the outcome: a database refusing it left the pause in
    Redis only, and a Redis restart lifted it. Written with the outcome, it is as durable as the dead letter."""
    run, spec, lease = _claimed(services, "exit78")
    result = _exited(executor.EXIT_CONFIG)
    outcome_written: list[bool] = []

    def committed(_session: Any) -> None:
        outcome_written.append(True)

    def refuse_writes_after_the_outcome(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if outcome_written and statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            raise OperationalError(statement, None, Exception("the database system is shutting down"))

    event.listen(services.engine, "before_cursor_execute", refuse_writes_after_the_outcome)
    event.listen(db.Session, "after_commit", committed)
    try:
        executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None, 0, 0)
    finally:
        event.remove(services.engine, "before_cursor_execute", refuse_writes_after_the_outcome)
        event.remove(db.Session, "after_commit", committed)
    assert outcome_written, "the outcome never committed"
    services.redis.flushdb()  # Redis restarts without persistence
    with db.session(services.engine) as session:
        assert pause.check(session, services.redis, "exit78").paused, "the agent's own pause was lost with Redis"


# ---------------------------------------------------------------- an attempt that lost its run


def test_a_lost_attempts_spend_is_booked_although_redis_blips_at_its_lease_release(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt whose run was taken over gives its lease back, then books what it spent. A Redis error at the
    release raised out of the execute before the booking: the money was gone from the ledger."""
    queued = dispatch(services, DispatchRequest("echo", uuid.uuid4().hex, actor="test"), lambda *_: None)

    def lost_its_run(_services: Any, _run: Any, _spec: Any, watcher: Any, _ownership: Any) -> ProcessResult:
        watcher.stop_reason = "lease_lost"
        return _exited(0, cost=50_000)

    monkeypatch.setattr(executor, "_run_attempt", lost_its_run)
    monkeypatch.setattr(services.leases, "release", _redis_restarting)
    executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None)
    assert _row(services, queued.run_id or "").cost_micros == 50_000, "the lost attempt's spend was never booked"


def test_an_orphaned_spend_the_database_never_took_says_how_much_was_lost(services: Services) -> None:
    """The booking gives up after outcome_retry_s; its log line is then the only record of the money the
    ledger never got, so it carries the amount."""
    run, _spec, _lease = _claimed(services, "echo")
    services.config.fleet.outcome_retry_s = 0.1

    def down(*_args: Any) -> None:
        raise OperationalError("SELECT", None, Exception("the database system is shutting down"))

    event.listen(services.engine, "before_cursor_execute", down)
    try:
        with capture_logs() as logged:
            executor._book_orphaned_spend(services, run, 70_000)
    finally:
        event.remove(services.engine, "before_cursor_execute", down)
    lost = [line for line in logged if line["event"] == "run.orphaned_spend_lost"]
    assert lost and lost[-1].get("micros") == 70_000, f"the money lost is not in its log line: {logged}"


def test_a_lost_attempts_spend_booked_as_it_ran_is_not_booked_again_after_an_ambiguous_commit(
        services: Services) -> None:
    """The bookkeeper books a lost attempt's steps as they come; one whose commit reached the database but whose
    answer was lost stayed unbooked in its count, and the end booked it again: $0.05 spent, $0.10 in the
    ledger. Every booking of a lost attempt's spend leaves a receipt of the total booked, and books only the rest."""
    run, spec, lease = _claimed(services, "echo")
    books = Bookkeeper(services, run, lease, executor.caps_of(services, spec), Ownership(30.0), None)
    books.lost = True
    books.report(50_000)
    answers_lost = [1]

    def answer_lost(_session: Any) -> None:
        if answers_lost[0]:
            answers_lost[0] -= 1
            raise OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))

    event.listen(db.Session, "after_commit", answer_lost)
    try:
        books._book()
    finally:
        event.remove(db.Session, "after_commit", answer_lost)
    assert answers_lost == [0], "the booking never committed"
    executor._book_orphaned_spend(services, run, 50_000 - books.charged)  # as the end books what is left
    assert _row(services, run.id).cost_micros == 50_000, "the lost attempt's $0.05 was booked twice"


def _answer_lost_once() -> tuple[list[int], Any]:
    """An after_commit hook: the first commit reaches the database, and its answer is lost."""
    left = [1]

    def answer_lost(_session: Any) -> None:
        if left[0]:
            left[0] -= 1
            raise OperationalError("COMMIT", None, Exception("server closed the connection unexpectedly"))
    return left, answer_lost


def test_a_resume_while_the_outcome_is_retried_is_not_undone_by_the_agents_own_pause_flag(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the outcome (its pause with it) commits but its answer is lost; while it waits to try
    again, the operator resumes the agent (the mirror released, no flag to delete yet); the retry knows its own
    commit and raised the flag: Redis paused the agent, the mirror said released, nothing ever cleared it."""
    run, spec, lease = _claimed(services, "exit78")
    result = _exited(executor.EXIT_CONFIG)
    left, answer_lost = _answer_lost_once()

    def operator_resumes(*_args: Any) -> None:
        assert pause.release(services.engine, services.redis, scope="exit78", actor="operator", now=services.now())

    monkeypatch.setattr(executor, "_wait_keeping", operator_resumes)
    event.listen(db.Session, "after_commit", answer_lost)
    try:
        ended = executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None,
                                 0, 0)
    finally:
        event.remove(db.Session, "after_commit", answer_lost)
    assert left == [0] and ended.status == "dead", ended
    with db.session(services.engine) as session:
        state = pause.check(session, services.redis, "exit78")
    assert not state.paused, f"the operator's resume was undone by the agent's flag: {state}"


def test_two_bookings_of_a_lost_attempts_spend_at_once_book_it_once(services: Services) -> None:
    """Found by review: the bookkeeper's booking (outliving its join) and the end's, at once on PostgreSQL: the
    second read no receipt before it waited on the run's row, then booked the whole total again."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's BEGIN IMMEDIATE serialises the two")
    run, _spec, _lease = _claimed(services, "echo")
    first = db.session(services.engine)
    book_lost_spend(first, run=run, total=50_000, now=services.now())  # the bookkeeper's, not committed yet
    the_end = threading.Thread(target=executor._book_orphaned_spend, args=(services, run, 50_000))
    the_end.start()

    def the_end_waits_on_a_lock() -> bool:
        with services.engine.connect() as probe:
            return bool(probe.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()")).scalar())

    try:
        waited = wait_for(the_end_waits_on_a_lock, 10, "the end's booking to wait on the first one's lock",
                          interval=0.02)
    finally:
        first.commit()
        first.close()
        the_end.join(10)
    assert waited
    assert _row(services, run.id).cost_micros == 50_000, "the lost attempt's $0.05 was booked twice"


# ---------------------------------------------------------------- the reaper's stand-in, then the real figure


def _taken_over(services: Services, run: Run) -> None:
    """The reaper takes the running attempt over as it would after a partition: heartbeat old, lease lapsed and
    seen lapsed a whole TTL ago (set here, so no test waits for it)."""
    from datetime import timedelta

    from fleet import keys, sweeps

    with db.session(services.engine) as session:
        row = session.get(Run, run.id)
        assert row is not None and row.heartbeat_at is not None
        row.heartbeat_at -= timedelta(hours=1)
        session.add(row)
        session.commit()
    services.leases.release(services.leases.holders(run.agent, 1)[0])
    seconds, _ = services.redis.time()
    services.redis.set(keys.suspect(run.id), f"{run.fence}:{int(seconds) - 3600}")
    assert sweeps.reap(services, lambda *_: None).counts.get("abandoned") == 1


@pytest.mark.parametrize("spent", [10_000, 4_000, 25_000], ids=["as-reserved", "less", "more"])
def test_an_abandoned_attempts_stand_in_gives_way_to_what_it_spent(services: Services, spent: int) -> None:
    """The reaper books an abandoned attempt its whole reservation ($0.01), a stand-in for what it may have spent
    unseen. The partition heals and the old executor, its run taken over, books what its agent did spend: on top
    of the stand-in, so $0.01 spent was booked $0.02, and nothing reconciled it (found by review). What it spent
    now replaces the stand-in, up or down."""
    run, spec, lease = _claimed(services, "echo")
    _taken_over(services, run)
    result = _exited(0, cost=spent)
    ended = executor._finish(services, run, spec, lease, result, executor.judge(result, "lease_lapsed"),
                             lambda *_: None, spent, 0)
    assert ended.status == "stale", ended
    with db.session(services.engine) as session:
        day = session.exec(select(SpendDay).where(SpendDay.scope == "*")).one()
    assert (_row(services, run.id).cost_micros, day.spent_micros) == (spent, spent)


# ---------------------------------------------------------------- the breaker's count through a Redis blip


def _breaker_events(services: Services, run_id: str) -> list[str]:
    from fleet.models import RunEvent

    with db.session(services.engine) as session:
        return [kind for kind in session.exec(select(RunEvent.kind).where(RunEvent.run_id == run_id))
                if kind.startswith("breaker.")]


def test_an_auth_failure_whose_finish_meets_a_redis_blip_still_opens_its_breaker(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the finish (the lease freed and the outcome counted by the breaker, one script) was tried
    once and a Redis error only logged: a revoked key (exit 77, which opens the breaker at once) kept its breaker
    closed, and every later tick spawned the agent again with the revoked key. Redis back a moment later, the
    outcome is counted."""
    run, spec, lease = _claimed(services, "exit77")
    result = _exited(executor.EXIT_AUTH)
    finish, blips = services.admissions.finish, [1]

    def blip_once(*args: Any, **kwargs: Any) -> Any:
        if blips[0]:
            blips[0] -= 1
            raise redis_lib.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return finish(*args, **kwargs)

    monkeypatch.setattr(services.admissions, "finish", blip_once)
    ended = executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None, 0, 0)
    assert ended.status == "dead" and blips == [0], ended
    assert services.breakers.state("exit77").get("state") == "open", "the revoked key's failure was never counted"
    assert _breaker_events(services, run.id) == ["breaker.open"]


def test_a_finish_whose_answer_was_lost_counts_its_failure_once_and_still_says_the_breaker_opened(
        services: Services) -> None:
    """The finish script ran but the connection dropped before its answer came back (a real cut, through a fault
    proxy): counting it again must not count the failure twice, and the transition it made (closed -> open) must
    still be told (its event, its alert), though a second count would find the breaker open already."""
    from dataclasses import replace

    from fleet.admission import _FINISH
    from fleet.services import redis_client
    from tests.faults.proxy import FaultProxy

    run, spec, lease = _claimed(services, "exit77")
    result = _exited(executor.EXIT_AUTH)
    target = redis_lib.Redis.from_url(services.settings.broker_url)
    proxy = FaultProxy("127.0.0.1", target.connection_pool.connection_kwargs["port"]).start()
    database = target.connection_pool.connection_kwargs.get("db", 0)
    cut = replace(services, redis=redis_client(f"redis://127.0.0.1:{proxy.port}/{database}"))
    try:
        cut.redis.script_load(_FINISH)  # loaded: the EVALSHA that is cut runs the script (no NOSCRIPT first)
        proxy.cut_on(b"EVALSHA")
        ended = executor._finish(cut, run, spec, lease, result, executor.judge(result, None), lambda *_: None, 0, 0)
    finally:
        cut.redis.close()
        target.close()
        proxy.stop()
    assert ended.status == "dead" and proxy.cuts == 1, ended
    state = services.breakers.state("exit77")
    assert (state.get("state"), state.get("failures")) == ("open", "1"), f"counted {state}"
    assert _breaker_events(services, run.id) == ["breaker.open"], "the breaker opened, and nobody was told"


def test_a_retried_failure_whose_lease_renewal_meets_a_redis_blip_still_counts_in_its_breaker(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retryable failure renews its lease for the retry, sends the retry, then counts the failure, all in one
    try: a Redis error at the renewal skipped the count too (the reaper sends the retry again; nothing counts the
    failure), so an agent failing while Redis blips kept its breaker closed."""
    run, spec, lease = _claimed(services, "fail")
    result = _exited(1)
    renew, blips = services.leases.renew, [1]

    def blip_once(*args: Any, **kwargs: Any) -> Any:
        if blips[0]:
            blips[0] -= 1
            raise redis_lib.ConnectionError("Connection reset by peer")
        return renew(*args, **kwargs)

    monkeypatch.setattr(services.leases, "renew", blip_once)
    ended = executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None, 0, 0)
    assert ended.status == "queued" and blips == [0], ended
    assert services.breakers.state("fail").get("failures") == "1", "the failure was never counted"


def test_a_retry_dead_lettered_over_cap_at_its_claim_raises_its_alert_through_a_redis_blip(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a retry whose estimate no longer fits under the cap ends dead (`over_cap`) at its claim;
    the dead letter committed, then its lease was given back in Redis before the alert: a Redis error there
    raised out of the execute, and the dead letter was never told (nothing alerts for it later)."""
    run, spec, lease = _claimed(services, "fail")
    result = _exited(1)
    assert executor._finish(services, run, spec, lease, result, executor.judge(result, None), lambda *_: None,
                            0, 0).status == "queued"
    with db.session(services.engine) as session:  # the day's spend reaches the fleet's cap meanwhile
        session.execute(text("UPDATE spend_days SET spent_micros = 1000000000 WHERE scope = '*'"))
        session.commit()
    monkeypatch.setattr(services.leases, "release", _redis_restarting)
    with capture_logs() as logged:
        try:
            ended = executor._claim(services, run.id, lease.fence)
        except redis_lib.RedisError:
            ended = None
    assert _row(services, run.id).status == "dead"
    alerted = [line["kind"] for line in logged if line["event"] == "alert" and line.get("run_id") == run.id]
    assert (alerted, getattr(ended, "status", None)) == (["dead_letter"], "dead"), "dead-lettered, nobody was told"
