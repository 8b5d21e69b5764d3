"""The idempotency and retention sweeps, and beat's catch-up rule, against a real database and Redis
(no workers needed: the sweeps are plain functions of the store and the clock)."""

from __future__ import annotations

import dataclasses
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

import beat_schedule
from fleet import db, keys, sweeps
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import DeadLetter, Run, RunEvent, RunStatus
from fleet.schedule import parse_schedule
from fleet.services import Services


def finished_run(svc: Services, agent: str, key: str, *, days_ago: float,
                 status: RunStatus = RunStatus.SUCCEEDED) -> Run:
    """A run as a dispatch leaves it, then aged and ended."""
    sent: list[tuple[str, int]] = []
    result = dispatch(svc, DispatchRequest(agent, key, actor="test"), lambda *message: sent.append(message))
    assert result.status == "queued"
    at = datetime.now(UTC) - timedelta(days=days_ago)
    with db.session(svc.engine) as session:
        run = session.get(Run, result.run_id)
        assert run is not None
        run.status, run.created_at, run.finished_at = status, at, at
        session.add(run)
        session.add(RunEvent(at=at, kind="run.succeeded", run_id=run.id, agent=agent))
        session.commit()
    svc.leases.release(svc.leases.holders(agent, 1)[0])
    path = svc.settings.log_dir / "runs" / f"{run.id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("output\n")
    return run


def test_idempotency_sweep_lets_an_old_key_run_again(services: Services) -> None:
    old = finished_run(services, "echo", "nightly", days_ago=8)
    fresh = finished_run(services, "echo", "today", days_ago=0)
    report = sweeps.release_keys(services)
    assert report.counts == {"released": 1} and report.runs == [old.id]
    again = dispatch(services, DispatchRequest("echo", "nightly", actor="test"), lambda *_: None)
    assert again.status == "queued" and again.run_id != old.id  # the key was free again
    assert dispatch(services, DispatchRequest("echo", "today", actor="test"), lambda *_: None).run_id == fresh.id
    assert sweeps.release_keys(services).counts == {}  # nothing twice


def test_retention_prunes_old_runs_events_and_logs_but_keeps_dead_letters(services: Services) -> None:
    old = finished_run(services, "echo", "old", days_ago=40)
    dead = finished_run(services, "fail", "dead", days_ago=40, status=RunStatus.DEAD)
    recent = finished_run(services, "counter", "recent", days_ago=1)
    with db.session(services.engine) as session:
        session.add(DeadLetter(run_id=dead.id, agent="fail", reason="failed", attempts=2,
                               created_at=datetime.now(UTC) - timedelta(days=40)))
        session.commit()
    report = sweeps.prune(services)
    assert report.counts["runs_deleted"] == 1
    with db.session(services.engine) as session:
        assert session.get(Run, old.id) is None
        assert session.get(Run, dead.id) is not None and session.get(Run, recent.id) is not None
        assert session.exec(select(DeadLetter)).one().run_id == dead.id
        assert all(e.at > datetime.now(UTC) - timedelta(days=30)
                   for e in session.exec(select(RunEvent)) if e.at.tzinfo)
    logs = services.settings.log_dir / "runs"
    assert not (logs / f"{old.id}.log").exists() and (logs / f"{recent.id}.log").exists()


def test_log_retention_keeps_the_newest_logs(services: Services) -> None:
    limited = dataclasses.replace(services.config,
                                  fleet=services.config.fleet.model_copy(update={"log_retention_runs": 2}))
    svc = dataclasses.replace(services, config=limited)
    folder = svc.settings.log_dir / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        path = folder / f"{i:032x}.log"
        path.write_text("x")
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    sweeps.prune(svc)
    assert sorted(p.name for p in folder.iterdir()) == [f"{3:032x}.log", f"{4:032x}.log"]


def test_missed_slots_collapse_into_one_catch_up() -> None:
    entry = beat_schedule.FleetSchedule(parse_schedule("every 60s"), "UTC", "every 60s")
    long_ago = datetime.now(UTC) - timedelta(hours=5)  # beat was down for 300 slots
    due = entry.is_due(long_ago)
    assert due.is_due and due.next <= 60  # one catch-up now ...
    after = entry.is_due(datetime.now(UTC))
    assert not after.is_due  # ... and no burst of the 299 others


def _silent_running(svc: Services, agent: str, stamped: timedelta = timedelta(hours=-1)) -> Run:
    """A run as a worker that died mid-run leaves it: running, its heartbeat old, its lease gone and
    seen lapsed by the reaper a whole lease TTL ago (so this pass takes it over)."""
    result = dispatch(svc, DispatchRequest(agent, "silent", actor="test"), lambda *_: None)
    assert result.status == "queued"
    with db.session(svc.engine) as session:
        run = session.get(Run, result.run_id)
        assert run is not None
        run.status, run.heartbeat_at = RunStatus.RUNNING, datetime.now(UTC) + stamped
        session.add(run)
        session.commit()
    svc.leases.release(svc.leases.holders(agent, 1)[0])
    seconds, _ = svc.redis.time()
    svc.redis.set(keys.suspect(run.id), f"{run.fence}:{int(seconds) - 3600}")
    return run


def test_a_run_row_locked_by_a_frozen_executor_holds_up_no_other_reaping(services: Services) -> None:
    """An executor stopped (SIGSTOP, a frozen VM) inside its heartbeat transaction keeps its run's row
    locked for as long as it stays stopped. The reaper passes that run by, to try again next pass,
    and still reaps the others; it used to wait on the lock forever, and no run was reaped again."""
    if services.engine.dialect.name == "sqlite":
        pytest.skip("SQLite's write lock is the whole database's: a frozen writer stops every writer")
    frozen, dead = _silent_running(services, "echo"), _silent_running(services, "counter")
    holder = services.engine.connect()
    holder.begin()
    holder.execute(select(Run).where(col(Run.id) == frozen.id).with_for_update())  # what the heartbeat holds
    done: list[sweeps.SweepReport] = []
    worker = threading.Thread(target=lambda: done.append(sweeps.reap(services, lambda *_: None)), daemon=True)
    worker.start()
    worker.join(timeout=10)  # well inside the 20 s after which PostgreSQL ends a frozen client's session
    try:
        assert done, "the reaper waited on the frozen executor's row lock"
        assert done[0].counts.get("row_locked") == 1 and "abandoned" in done[0].counts
        with db.session(services.engine) as session:
            assert session.get(Run, dead.id).status != RunStatus.RUNNING  # type: ignore[union-attr]
    finally:
        holder.rollback()
        holder.close()
        worker.join(timeout=20)
    with db.session(services.engine) as session:
        assert session.get(Run, frozen.id).status == RunStatus.RUNNING  # type: ignore[union-attr]
    again = sweeps.reap(services, lambda *_: None)  # the executor stayed dead: the next pass takes it over
    assert again.counts.get("abandoned") == 1 and frozen.id in again.runs


def test_a_dead_workers_run_whose_last_heartbeat_came_from_a_clock_ahead_is_reaped(services: Services) -> None:
    """SQLite's clock is its host's: a heartbeat stamped while that clock ran an hour ahead (then stepped back)
    kept the run out of the reaper's sight for that hour, its worker dead and its slot held. A stamp later than
    a lease TTL ahead says a clock moved; the lease decides then, as for any silent run (found by review)."""
    ahead = _silent_running(services, "echo", stamped=timedelta(hours=1))
    report = sweeps.reap(services, lambda *_: None)
    assert report.counts.get("abandoned") == 1 and ahead.id in report.runs, report


def test_a_crash_loop_buried_while_redis_is_away_still_raises_its_alert(services: Services, closed_port: int) -> None:
    """Found by review: a last attempt left abandoned (the pass that abandoned it stopped at a Redis error after its
    commit, or Redis went away since) is buried `crash_loop` by the next pass, which needs only the database. The
    bury committed the dead letter, then gave the lease back in Redis before its alert: Redis away, the pass raised
    there and the alert never went. Nothing alerts for that dead letter later (the run is dead): a crash loop
    dead-lettered in silence."""
    import contextlib

    import redis as redis_lib
    from structlog.testing import capture_logs

    from fleet.services import redis_client

    sent: list[tuple[str, int]] = []
    queued = dispatch(services, DispatchRequest("crashy", "loop", actor="test"), lambda *message: sent.append(message))
    assert queued.status == "queued"
    with db.session(services.engine) as session:
        run = session.get(Run, queued.run_id)
        assert run is not None
        run.status, run.attempt = RunStatus.ABANDONED, 2
        session.add(run)
        session.commit()
    away = dataclasses.replace(services, redis=redis_client(f"redis://127.0.0.1:{closed_port}/0", timeout_s=0.5))
    try:
        # What a pass may raise with Redis away is not the point here: what it told is.
        with capture_logs() as logged, contextlib.suppress(redis_lib.RedisError):
            sweeps.reap(away, lambda *_: None)
    finally:
        away.redis.close()
    with db.session(services.engine) as session:
        assert session.exec(select(DeadLetter).where(DeadLetter.run_id == queued.run_id)).one().reason == "crash_loop"
    alerted = [line for line in logged if line["event"] == "alert" and line.get("run_id") == queued.run_id]
    assert [line["kind"] for line in alerted] == ["crash_loop"], "dead-lettered, and nobody was told"


def test_a_half_open_trial_that_crash_loops_opens_its_breaker_again(services: Services) -> None:
    """Found by review: a run whose worker dies on every attempt (an agent that OOM-kills it) is buried
    `crash_loop`, and its breaker heard nothing but a forfeit: as the half-open trial it freed the trial, so the
    very next tick was let through as a new trial, killing two more workers, and so on at every tick, the
    breaker never open. A crash loop is the agent's failure: the trial's failure opens the breaker again."""
    services.redis.hset(keys.breaker("crashy"), mapping={"state": "open", "opened_at": "0"})  # cooled down long ago
    queued = dispatch(services, DispatchRequest("crashy", "loop", actor="test"), lambda *_: None)
    assert queued.status == "queued" and services.breakers.state("crashy").get("trial") == queued.run_id
    with db.session(services.engine) as session:  # both attempts died with their workers; the reaper took each over
        run = session.get(Run, queued.run_id)
        assert run is not None
        run.status, run.attempt = RunStatus.ABANDONED, 2
        session.add(run)
        session.commit()
    assert sweeps.reap(services, lambda *_: None).counts.get("dead_crash_loop") == 1
    assert services.breakers.state("crashy").get("state") == "open", services.breakers.state("crashy")
    again = dispatch(services, DispatchRequest("crashy", "next-tick", actor="test"), lambda *_: None)
    assert again.reason == "breaker_open", again
