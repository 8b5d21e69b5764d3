"""Sweeps that clean up after crashes and time, run by beat and by `fleet sweep NAME`.

reaper       - a running run whose heartbeat stopped (its lease expired) is abandoned: an orphaned
               agent group on this host is killed first, then the run is retried once on the same
               row or dead-lettered as `crash_loop`; never-started runs whose message was lost are
               re-sent once, stale ones archived. Finished runs are never touched.
idempotency  - keys older than `idempotency_ttl_s` are released so the same work key may run again.
retention    - old finished runs, events and run logs are pruned in batches; dead letters stay.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, or_, update
from sqlmodel import col, select

from fleet import alerts, db, killswitch, ledger, store
from fleet.dispatch import Sender, archive
from fleet.executor import run_log_path
from fleet.locks import Lease
from fleet.models import TERMINAL, DeadLetter, Run, RunEvent, RunStatus
from fleet.services import Services

BATCH = 500
NEVER_DISPATCHED_S = 300.0  # a dispatch takes milliseconds: five minutes in `created` means it died


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


def reap(services: Services, send: Sender) -> SweepReport:
    """Recover runs whose worker died, and queued runs whose message was lost."""
    report = SweepReport("reaper")
    for run in _silent_runs(services):
        _reap_running(services, run, send, report)
    for run in _abandoned_runs(services):
        _requeue_or_bury(services, run, send, report)
    for run in _queued_runs(services):
        _check_queued(services, run, send, report)
    _archive_never_dispatched(services, report)
    return report


def _archive_never_dispatched(services: Services, report: SweepReport) -> None:
    """A run left `created` (its dispatcher died between create and queue) would hold its key forever."""
    cutoff = services.now() - timedelta(seconds=NEVER_DISPATCHED_S)
    with db.session(services.engine) as session:
        for run in session.exec(select(Run).where(Run.status == RunStatus.CREATED, col(Run.created_at) < cutoff)
                                .limit(BATCH)):
            if archive(session, services, run, reason="never dispatched"):
                report.add("archived_never_dispatched", run.id)
        if report.counts.get("archived_never_dispatched"):
            session.commit()


def _silent_runs(services: Services) -> list[Run]:
    cutoff = services.now() - timedelta(seconds=services.config.fleet.lease_ttl_s)
    with db.session(services.engine) as session:
        query = select(Run).where(Run.status == RunStatus.RUNNING, col(Run.heartbeat_at) < cutoff).limit(BATCH)
        return list(session.exec(query))


def _abandoned_runs(services: Services) -> list[Run]:
    with db.session(services.engine) as session:
        return list(session.exec(select(Run).where(Run.status == RunStatus.ABANDONED).limit(BATCH)))


def _queued_runs(services: Services) -> list[Run]:
    # Only runs queued a while ago: a fresh one's message may simply not have been consumed yet.
    cutoff = services.now() - timedelta(seconds=services.config.fleet.lease_ttl_s)
    with db.session(services.engine) as session:
        query = select(Run).where(Run.status == RunStatus.QUEUED, col(Run.queued_at) < cutoff,
                                  or_(col(Run.retry_at).is_(None), col(Run.retry_at) < cutoff)).limit(BATCH)
        return list(session.exec(query))


def _lease_of(run: Run) -> Lease | None:
    if run.slot is None or run.fence is None:
        return None
    return Lease(run.agent, run.slot, run.id, run.fence)


def _reap_running(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    lease = _lease_of(run)
    if lease is not None and services.leases.holder(run.agent, lease.slot) == lease:
        return  # the lease is still renewed: the executor lives, only its database heartbeat lags
    if run.host == services.host and run.pgid:
        _kill_group(run.pgid)
        report.add("orphans_killed", run.id)
    now = services.now()
    with db.session(services.engine) as session:
        claimed = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.RUNNING,
                                                    col(Run.fence) == run.fence)
                                  .values(status=RunStatus.ABANDONED, updated_at=now, pid=None, pgid=None,
                                          error="worker died mid-run (heartbeat stopped)"))
        if db.rowcount(claimed) != 1:
            return
        store.add_event(session=session, at=now, kind="run.abandoned", run_id=run.id, agent=run.agent,
                        attempt=run.attempt, host=run.host)
        session.commit()
    if lease is not None:
        services.leases.release(lease)
    report.add("abandoned", run.id)
    run.status = RunStatus.ABANDONED
    _requeue_or_bury(services, run, send, report)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


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
    if spec is None:
        _bury(services, run, "failed", "agent no longer configured", report)
        return
    lease = services.leases.acquire(run.agent, spec.concurrency, run.id, ttl_s=services.config.fleet.stale_after_s)
    if lease is None:
        report.add("waiting_for_slot", run.id)  # the next pass tries again
        return
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.ABANDONED)
                                .values(status=RunStatus.QUEUED, fence=lease.fence, slot=lease.slot, queued_at=now,
                                        updated_at=now, retry_at=None))
        if db.rowcount(moved) != 1:
            session.rollback()
            services.leases.release(lease)
            return
        store.add_event(session=session, at=now, kind="run.retrying", run_id=run.id, agent=run.agent,
                        attempt=run.attempt, reason="abandoned", fence=lease.fence)
        session.commit()
    send(run.id, lease.fence)
    report.add("requeued", run.id)


def _end_abandoned(services: Services, run: Run, status: RunStatus, error: str,
                   dead_reason: str | None = None) -> bool:
    """End an abandoned run for good (killed, or dead-lettered with `dead_reason`); False if it moved on."""
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.ABANDONED)
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
        kind = "run.dead_lettered" if dead_reason is not None else f"run.{status.value}"
        store.add_event(session=session, at=now, kind=kind, run_id=run.id, agent=run.agent, reason=dead_reason,
                        error=error)
        session.commit()
    return True


def _end_killed(services: Services, run: Run, reason: str, report: SweepReport) -> None:
    """An abandoned run of a killed scope is not retried: it ends killed."""
    if _end_abandoned(services, run, RunStatus.KILLED, reason):
        report.add("killed", run.id)


def _bury(services: Services, run: Run, reason: str, error: str, report: SweepReport) -> None:
    if not _end_abandoned(services, run, RunStatus.DEAD, error, dead_reason=reason):
        return
    alerts.alert("crash_loop" if reason == "crash_loop" else "dead_letter",
                 f"run {run.id} of {run.agent} was dead-lettered by the reaper: {error}",
                 agent=run.agent, run_id=run.id, reason=reason, attempts=run.attempt)
    report.add(f"dead_{reason}", run.id)


def _tail(services: Services, run_id: str, size: int = 8192) -> str | None:
    path = run_log_path(services.settings.log_dir, run_id)
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def _check_queued(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    stale_cutoff = services.now() - timedelta(seconds=services.config.fleet.stale_after_s)
    lease = _lease_of(run)
    if run.queued_at is not None and run.queued_at < stale_cutoff:
        with db.session(services.engine) as session:
            fresh = session.get(Run, run.id)
            if fresh is not None and archive(session, services, fresh, reason="stale"):
                report.add("archived_stale", run.id)
            session.commit()
        return
    if lease is not None and services.leases.holder(run.agent, lease.slot) == lease:
        return  # still waiting its turn in the broker, with its slot held
    _resend_lost(services, run, send, report)


def _resend_lost(services: Services, run: Run, send: Sender, report: SweepReport) -> None:
    """A queued run without its lease lost its message too (Redis restarted): send it again, once."""
    spec = services.config.agents.get(run.agent)
    with db.session(services.engine) as session:
        resent = session.exec(select(func.count()).select_from(RunEvent).where(
            RunEvent.run_id == run.id, RunEvent.kind == "run.resent")).one()
        if resent or spec is None:
            if archive(session, services, run, reason="message lost twice" if spec else "agent removed"):
                report.add("archived_lost", run.id)
            session.commit()
            return
    lease = services.leases.acquire(run.agent, spec.concurrency, run.id, ttl_s=services.config.fleet.stale_after_s)
    if lease is None:
        report.add("waiting_for_slot", run.id)
        return
    now = services.now()
    with db.session(services.engine) as session:
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED,
                                                  col(Run.fence) == run.fence)
                                .values(fence=lease.fence, slot=lease.slot, queued_at=now, updated_at=now))
        if db.rowcount(moved) != 1:
            session.rollback()
            services.leases.release(lease)
            return
        store.add_event(session=session, at=now, kind="run.resent", run_id=run.id, agent=run.agent, fence=lease.fence)
        session.commit()
    send(run.id, lease.fence)
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
        events = db.rowcount(session.execute(delete(RunEvent).where(col(RunEvent.at) < cutoff)))
        session.commit()
    for run_id in old:
        run_log_path(services.settings.log_dir, run_id).unlink(missing_ok=True)
        report.add("runs_deleted")
    report.counts["events_deleted"] = int(events)
    report.counts["logs_deleted"] = report.counts.get("runs_deleted", 0) + _trim_logs(services)
    return report


def _trim_logs(services: Services) -> int:
    """Keep only the newest `log_retention_runs` run logs."""
    folder = services.settings.log_dir / "runs"
    if not folder.is_dir():
        return 0
    files = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    extra = files[services.config.fleet.log_retention_runs:]
    for path in extra:
        path.unlink(missing_ok=True)
    return len(extra)
