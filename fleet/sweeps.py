"""Sweeps that clean up after crashes and time, run by beat and by `fleet sweep NAME`.

reaper       - a running run whose heartbeat stopped and whose lease lapsed is abandoned, then retried
               once on the same row or dead-lettered as `crash_loop`. It never kills a process: the
               host that ran the attempt does (the launcher stops its own group once its executor
               dies or cannot prove its lease), and the lease must have been seen lapsed for a whole
               lease TTL first, so a retry never overlaps an attempt that may still live. A queued run
               whose message no worker claimed within `resend_after_s` is sent again (same fence: a
               duplicate delivery starts nothing); once its resent message is lost too it is
               dead-lettered as `lost`. One still waiting in the broker behind a busy queue, or sent
               again and held unclaimed by a live worker (`waiting` asks), keeps its slot and is never
               archived. Finished runs are never touched.
idempotency  - keys older than `idempotency_ttl_s` are released so the same work key may run again.
retention    - old finished runs, events and run logs are pruned in batches; dead letters stay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import and_, delete, or_, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import alerts, db, keys, killswitch, ledger, logs, runlog, store
from fleet.breaker import Outcome
from fleet.dispatch import Sender
from fleet.errors import first_line
from fleet.executor import breaker_changed, give_back_ended, run_log_path
from fleet.locks import Lease
from fleet.models import TERMINAL, DeadLetter, Run, RunEvent, RunStatus
from fleet.services import Services

BATCH = 500
NEVER_DISPATCHED_S = 300.0  # a dispatch takes milliseconds: five minutes in `created` means it died
MAX_SENDS = 2  # an attempt's message, and one resend

# Which of these queued runs have an execute message still waiting in the broker (workers/broker.py).
Waiting = Callable[[Sequence[Run]], set[str]]


@dataclass
class SweepReport:
    """What a sweep did, for logs, `fleet sweep` and the Celery result."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)

    def add(self, what: str, run_id: str | None = None) -> None:
        """Count one action."""
        self.counts[what] = self.counts.get(what, 0) + 1
        if run_id is not None and len(self.runs) < 100:
            self.runs.append(run_id)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {"sweep": self.name, "counts": self.counts, "runs": self.runs}


# ---------------------------------------------------------------- reaper


def reap(services: Services, send: Sender, waiting: Waiting | None = None) -> SweepReport:
    """Recover runs whose worker died, and queued runs whose message was lost.

    `waiting` tells which queued runs still have a message in the broker; without it a quiet run is
    re-sent (harmless) but never declared lost.
    """
    report = SweepReport("reaper")
    for run in _silent_runs(services):
        _reap_running(services, run, send, report)
    for run in _abandoned_runs(services):
        _requeue_or_bury(services, run, send, report)
    _check_queued(services, _quiet_queued_runs(services), send, waiting, report)
    _drop_never_dispatched(services, report)
    return report


def _drop_never_dispatched(services: Services, report: SweepReport) -> None:
    """A run left `created` (its dispatcher died before queueing it) is deleted, not archived: nothing was
    accepted, so the caller's retry with the same key must dispatch afresh."""
    cutoff = services.now() - timedelta(seconds=NEVER_DISPATCHED_S)
    now = services.now()
    dropped = []
    with db.session(services.engine) as session:
        for run in session.exec(select(Run).where(Run.status == RunStatus.CREATED, col(Run.created_at) < cutoff)
                                .limit(BATCH)).all():
            gone = session.execute(delete(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.CREATED))
            if db.rowcount(gone) == 1:
                store.add_event(session=session, at=now, kind="dispatch.abandoned", run_id=run.id, agent=run.agent,
                                reason="its dispatcher died before queueing it")
                dropped.append(run)
        session.commit()
    for run in dropped:
        services.breakers.forfeit(run.agent, run.id)
        report.add("dropped_never_dispatched", run.id)


def _silent_runs(services: Services) -> list[Run]:
    with db.session(services.engine) as session:
        now, ttl = ledger.database_now(session), timedelta(seconds=services.config.fleet.lease_ttl_s)
        # A stamp more than a lease TTL ahead was made by a clock since stepped back (SQLite's is its host's): it
        # would hide the run until that clock caught up. Its lease decides instead, as for any silent run.
        silent = or_(col(Run.heartbeat_at) < now - ttl, col(Run.heartbeat_at) > now + ttl)
        return list(session.exec(select(Run).where(Run.status == RunStatus.RUNNING, silent).limit(BATCH)))


def _abandoned_runs(services: Services) -> list[Run]:
    with db.session(services.engine) as session:
        return list(session.exec(select(Run).where(Run.status == RunStatus.ABANDONED).limit(BATCH)))


def _quiet_queued_runs(services: Services) -> list[Run]:
    # Only runs sent a while ago (and retries past their due time): a fresh message may simply wait.
    # They are stamped by the database's clock, so on PostgreSQL a sender whose clock runs ahead hides
    # nothing; a reaper whose own clock runs ahead only re-sends early, which is harmless.
    fleet = services.config.fleet
    now = services.now()
    cutoff = now - timedelta(seconds=fleet.resend_after_s)
    # A stamp later than any right clock could have made it says a clock moved: SQLite's clock is its
    # host's, stepped back after a jump ahead (and a Celery countdown sent then waits as long). Such a
    # run counts as quiet: sending it again is harmless, waiting for that clock is not.
    future = now + timedelta(seconds=fleet.resend_after_s + 2 * fleet.retry_backoff_s)
    with db.session(services.engine) as session:
        quiet = and_(col(Run.queued_at) < cutoff, or_(col(Run.retry_at).is_(None), col(Run.retry_at) < cutoff))
        query = select(Run).where(Run.status == RunStatus.QUEUED,
                                  or_(quiet, col(Run.queued_at) > future, col(Run.retry_at) > future)).limit(BATCH)
        return list(session.exec(query))


def _lease_of(run: Run) -> Lease | None:
    if run.slot is None or run.fence is None:
        return None
    return Lease(run.agent, run.slot, run.id, run.fence)


def _lapsed_long_enough(services: Services, run: Run) -> bool:
    """Whether the run's lease has been seen lapsed for a whole lease TTL (by Redis's own clock).

    The executor stops its agent before its last proof of ownership runs out, and that proof may
    have been a renewal just before Redis lost the key: only once a full TTL has passed since the
    lapse was first seen can no agent of this attempt be alive anywhere.
    """
    marker = keys.suspect(run.id)
    seconds, _ = services.redis.time()
    first_seen = services.redis.set(marker, f"{run.fence}:{seconds}", nx=True,
                                    ex=int(4 * services.config.fleet.lease_ttl_s) + 1)
    if first_seen:
        return False
    value = str(services.redis.get(marker) or "")
    fence, _, since = value.partition(":")
    if fence != str(run.fence) or not since.isdigit():
        services.redis.set(marker, f"{run.fence}:{seconds}", ex=int(4 * services.config.fleet.lease_ttl_s) + 1)
        return False
    return int(seconds) - int(since) >= services.config.fleet.lease_ttl_s


def _reap_running(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    lease = _lease_of(run)
    if lease is not None and services.leases.holder(run.agent, lease.slot) == lease:
        return  # the lease is still renewed: the executor lives, only its database writes fail or lag
    if not _lapsed_long_enough(services, run):
        report.add("lapse_seen", run.id)  # the next pass decides, a lease TTL from now
        return
    try:
        with db.bounded_session(services.engine, _row_wait_s(services)) as session:
            if not _abandon(session, run, services.now()):
                return
    except OperationalError as exc:
        if not db.lock_timed_out(exc):
            raise
        # An executor frozen inside a transaction on this row (SIGSTOP, a suspended VM) holds its lock
        # until PostgreSQL ends its session: the other runs go on, this one is tried again next pass.
        report.add("row_locked", run.id)
        return
    if lease is not None:
        services.leases.release(lease)
    services.redis.delete(keys.suspect(run.id))
    report.add("abandoned", run.id)
    run.status = RunStatus.ABANDONED
    _requeue_or_bury(services, run, send, report)


def _row_wait_s(services: Services) -> float:
    """How long the reaper waits for one run's row: a heartbeat holds it for milliseconds."""
    return min(2.0, services.config.fleet.lease_ttl_s / 10)


def _abandon(session: Session, run: Run, now: datetime) -> bool:
    """Mark the attempt abandoned and book what it may have spent; False if it is no longer the
    reaper's to take (it ended, or another reaper took it first)."""
    claimed = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.RUNNING,
                                                col(Run.fence) == run.fence)
                              .values(status=RunStatus.ABANDONED, updated_at=now, pid=None, pgid=None,
                                      error="worker died mid-run (heartbeat stopped)"))
    if db.rowcount(claimed) != 1:
        return False
    # Its last usage lines may never have been read (the reader died with the worker): the attempt
    # is booked at its whole reservation, so a cap errs on the safe side, never the other.
    # If the attempt lived on unseen (a partition) and reports later, what it spent replaces this stand-in
    # (watch.book_lost_spend reads it from this event).
    fresh = session.get(Run, run.id, populate_existing=True)
    stand_in = 0
    if fresh is not None and fresh.settled_at is None and fresh.reserved_micros > 0:
        stand_in = fresh.reserved_micros
        ledger.charge(session, run=fresh, amount=stand_in, now=now)
    store.add_event(session=session, at=now, kind="run.abandoned", run_id=run.id, agent=run.agent,
                    attempt=run.attempt, fence=run.fence, host=run.host, stand_in=stand_in)
    session.commit()
    return True


def _requeue_or_bury(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    with db.session(services.engine) as session:
        kill = killswitch.check_mirror(session, run.agent)
    if kill.killed:
        _end_killed(services, run, kill.describe(), report)
        return
    if run.attempt >= run.max_attempts:
        _bury(services, run, "crash_loop", "the run's worker died on every attempt", report)
        return
    spec = services.config.agents.get(run.agent)
    if spec is None and services.config_change_pending():
        return  # the agent may be in the fleet.toml still settling: the next pass decides, with it taken
    if spec is None:
        _bury(services, run, "agent_removed", "agent no longer configured", report)
        return
    with db.session(services.engine) as session:
        taken = store.live_slots(session=session, agent=run.agent, besides=run.id)
    # A new fence in place of the abandoned attempt's: that attempt may have re-asserted its vanished lease
    # meanwhile, and must never pass for the retry. A fence another reaper issued first is kept.
    lease = services.leases.acquire(run.agent, spec.concurrency, run.id, ttl_s=services.config.fleet.queued_lease_ttl_s,
                                    taken=taken, replacing=run.fence)
    if lease is None:
        report.add("waiting_for_slot", run.id)  # the next pass tries again
        return
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.ABANDONED)
                                .values(status=RunStatus.QUEUED, fence=lease.fence, slot=lease.slot,
                                        queued_at=ledger.database_now(session), updated_at=now, retry_at=None,
                                        sends=1))
        if db.rowcount(moved) != 1:
            current = session.get(Run, run.id)
            session.rollback()
            if current is None or current.fence != lease.fence:
                services.leases.release(lease)  # ours alone; a lease the run was already moved with stays
            return
        store.add_event(session=session, at=now, kind="run.retrying", run_id=run.id, agent=run.agent,
                        attempt=run.attempt, reason="abandoned", fence=lease.fence)
        session.commit()
    send(run.id, lease.fence)
    report.add("requeued", run.id)


def _end_run(services: Services, run: Run, from_status: RunStatus, status: RunStatus, error: str,
             dead_reason: str | None = None) -> bool:
    """End a run for good (killed, or dead-lettered with `dead_reason`); False if it moved on meanwhile."""
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == from_status,
                                                  col(Run.fence) == run.fence)
                                .values(status=status, finished_at=now, updated_at=now, error=error))
        if db.rowcount(moved) != 1:
            session.rollback()
            return False
        fresh = session.get(Run, run.id, populate_existing=True)
        assert fresh is not None
        ledger.settle(session, run=fresh, now=now)
        if dead_reason is not None:
            session.add(DeadLetter(run_id=run.id, agent=run.agent, reason=dead_reason, attempts=run.attempt,
                                   exit_code=run.exit_code, last_error=error, output_tail=_tail(services, run.id),
                                   created_at=now))
            store.add_event(session=session, at=now, kind="run.dead_lettered", run_id=run.id, agent=run.agent,
                            reason=dead_reason, error=error)
        store.add_event(session=session, at=now, kind=f"run.{status.value}", run_id=run.id, agent=run.agent,
                        error=error)
        session.commit()
    give_back_ended(services, run)
    return True


def _end_killed(services: Services, run: Run, reason: str, report: SweepReport) -> None:
    """An abandoned run of a killed scope is not retried: it ends killed."""
    if _end_run(services, run, RunStatus.ABANDONED, RunStatus.KILLED, reason):
        report.add("killed", run.id)


def _bury(services: Services, run: Run, reason: str, error: str, report: SweepReport,
          from_status: RunStatus = RunStatus.ABANDONED) -> None:
    if not _end_run(services, run, from_status, RunStatus.DEAD, error, dead_reason=reason):
        return
    alerts.alert("crash_loop" if reason == "crash_loop" else "dead_letter",
                 f"run {run.id} of {run.agent} was dead-lettered by the reaper: {error}",
                 agent=run.agent, run_id=run.id, reason=reason, attempts=run.attempt)
    report.add(f"dead_{reason}", run.id)
    if reason == "crash_loop":
        _count_crash_loop(services, run)


def _count_crash_loop(services: Services, run: Run) -> None:
    """A run whose worker died on every attempt failed, as far as its breaker cares (an agent that kills its
    worker would otherwise run at every tick, and as a half-open trial let the next one straight through).
    Counted once, as its last attempt's outcome; a Redis error leaves the count out, never the dead letter."""
    spec = services.config.agents.get(run.agent)
    threshold = (spec.breaker_settings(services.config.fleet)[0] if spec is not None
                 else services.config.fleet.breaker_threshold)
    try:
        old, new = services.breakers.record(run.agent, run.id, Outcome.FAILURE, threshold=threshold,
                                            attempt=run.attempt)
        if new != old:
            breaker_changed(services, run, old, new)
    except (redis.RedisError, SQLAlchemyError) as exc:
        logs.get(__name__).warning("reaper.breaker_count_failed", run_id=run.id, error=first_line(exc))


def _tail(services: Services, run_id: str, size: int = 8192) -> str | None:
    # The shipped log first: the reaper rarely runs on the host that ran the attempt.
    with contextlib.suppress(SQLAlchemyError), db.session(services.engine) as session:
        shipped = runlog.tail(session, run_id, size)
        if shipped is not None:
            return shipped
    path = run_log_path(services.settings.log_dir, run_id)
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def _check_queued(services: Services, runs: list[Run], send: Sender, waiting: Waiting | None,
                  report: SweepReport) -> None:
    """Quiet queued runs: keep the slot of one still waiting, re-send one whose message is gone, once."""
    held = [run for run in runs if _hold_slot(services, run, report)]
    in_broker = waiting(held) if waiting is not None and held else set()
    for run in held:
        if run.id in in_broker:
            report.add("waiting", run.id)  # behind a busy queue, or held by a live worker: it keeps its slot
        elif run.sends >= MAX_SENDS and waiting is not None:
            _bury(services, run, "lost", "its execute message was lost, and so was the one sent again", report,
                  from_status=RunStatus.QUEUED)
        else:
            _resend(services, run, send, report)


def _hold_slot(services: Services, run: Run, report: SweepReport) -> bool:
    """Renew (or, after Redis lost it, re-assert) a queued run's lease; False while another run holds the slot."""
    lease = _lease_of(run)
    if lease is None:
        return False
    if services.leases.renew(lease, services.config.fleet.queued_lease_ttl_s):
        return True
    report.add("waiting_for_slot", run.id)  # the slot went to another run meanwhile: try again next pass
    return False


def _resend(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    """Send the same attempt again: its fenced claim makes a second delivery start nothing."""
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED,
                                                  col(Run.fence) == run.fence)
                                .values(queued_at=ledger.database_now(session), updated_at=now,
                                        sends=Run.sends + 1))
        if db.rowcount(moved) != 1:
            session.rollback()
            return
        store.add_event(session=session, at=now, kind="run.resent", run_id=run.id, agent=run.agent, fence=run.fence,
                        sends=run.sends + 1)
        session.commit()
    send(run.id, run.fence or 0)
    report.add("resent", run.id)


# ---------------------------------------------------------------- idempotency


def release_keys(services: Services) -> SweepReport:
    """Free the idempotency keys of finished runs older than the TTL (the rows stay, renamed)."""
    report = SweepReport("idempotency")
    cutoff = services.now() - timedelta(seconds=services.config.fleet.idempotency_ttl_s)
    with db.session(services.engine) as session:
        query = select(Run).where(col(Run.status).in_(list(TERMINAL)), col(Run.created_at) < cutoff,
                                  col(Run.idem_key).not_like("%#released")).limit(BATCH)
        for run in session.exec(query):
            run.idem_key = f"{run.idem_key[:560]}:{run.id}#released"
            session.add(run)
            report.add("released", run.id)
        session.commit()
    return report


# ---------------------------------------------------------------- retention


def prune(services: Services) -> SweepReport:
    """Delete finished runs and events past retention, and their logs; keep dead letters' runs."""
    report = SweepReport("retention")
    fleet = services.config.fleet
    cutoff = services.now() - timedelta(days=fleet.retention_days)
    with db.session(services.engine) as session:
        kept = select(DeadLetter.run_id)
        old = list(session.exec(select(Run.id).where(col(Run.status).in_(list(TERMINAL)), col(Run.finished_at) < cutoff,
                                                     col(Run.id).not_in(kept)).limit(BATCH)))
        if old:
            session.execute(delete(Run).where(col(Run.id).in_(old)))
            runlog.delete_runs(session, old)
        events = db.rowcount(session.execute(delete(RunEvent).where(col(RunEvent.at) < cutoff)))
        session.commit()
    for run_id in old:
        run_log_path(services.settings.log_dir, run_id).unlink(missing_ok=True)
        report.add("runs_deleted")
    report.counts["events_deleted"] = int(events)
    report.counts["logs_deleted"] = report.counts.get("runs_deleted", 0) + _trim_logs(services)
    return report


def _trim_logs(services: Services) -> int:
    """Keep only the newest `log_retention_runs` run logs, in the database and in this host's folder."""
    with db.session(services.engine) as session:
        runlog.keep_newest(session, services.config.fleet.log_retention_runs)
        session.commit()
    folder = services.settings.log_dir / "runs"
    if not folder.is_dir():
        return 0
    files = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    extra = files[services.config.fleet.log_retention_runs:]
    for path in extra:
        path.unlink(missing_ok=True)
    return len(extra)
