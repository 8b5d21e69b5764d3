"""The executor: step 5 of the dispatch. It owns a run from `queued` to the end.

It refuses to start unless the run's status and fence still match (a redelivered or stale message
is a `duplicate` and starts nothing), runs the agent in its own process group with a clean
environment, heartbeats the lease, watches the kill flag, and persists the outcome before anything
optional happens. A retryable failure goes back to the queue once, on the same row; the second
failure is dead-lettered.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from fleet import alerts, db, keys, killswitch, ledger, logs, store
from fleet.breaker import Outcome
from fleet.config import AgentSpec
from fleet.dispatch import caps_of
from fleet.errors import NotFoundError, UnavailableError
from fleet.locks import Lease
from fleet.models import DeadLetter, Run, RunStatus
from fleet.process import ProcessResult, run_agent
from fleet.services import Services
from fleet.usage import LineParser, make_parser

log = logs.get(__name__)

Requeue = Callable[[str, int, float], None]  # (run_id, fence, countdown_s)

# Exit codes shared with the CLI (DESIGN.md): what each one means for the run.
EXIT_OK, EXIT_IDLE, EXIT_TRANSIENT, EXIT_AUTH, EXIT_CONFIG = 0, 3, 75, 77, 78
POLL_TIMEOUT_S = 60.0
BAD_USAGE = "bad_usage"  # stop reason: a usage line Fleet cannot price (fleet/usage.py)


@dataclass
class ExecuteResult:
    """What `fleet.execute` returns (JSON)."""

    run_id: str
    status: str  # the run's status after this attempt, or duplicate / not_found / stale
    exit_code: int | None = None
    reason: str | None = None
    attempt: int | None = None
    retry_in_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only."""
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """How an attempt ended, and what follows from it."""

    status: RunStatus
    error: str | None
    retryable: bool
    breaker: Outcome
    pause: str | None = None  # pause the agent's schedule, and why
    dead_reason: str = "failed"  # the dead letter's reason if this ends the run


def execute(services: Services, run_id: str, fence: int, requeue: Requeue) -> ExecuteResult:
    """Run one attempt of a queued run, if (and only if) this message still owns it."""
    started = _claim(services, run_id, fence)
    if isinstance(started, ExecuteResult):
        return started
    run, spec, lease = started
    log.info("run.started", run_id=run.id, agent=run.agent, attempt=run.attempt, fence=fence)
    watcher = _Watcher(services, run, lease)
    result = _run_attempt(services, run, spec, watcher)
    if watcher.lost:
        services.leases.release(lease)  # only if the key still holds our fence
        return ExecuteResult(run.id, "stale", result.exit_code, "lease lost: another owner took the run over")
    verdict = judge(result, watcher.stop_reason, watcher.meter.problem if watcher.meter else None)
    return _finish(services, run, spec, lease, result, verdict, requeue, watcher)


# ---------------------------------------------------------------- claim


def _claim(services: Services, run_id: str, fence: int) -> tuple[Run, AgentSpec, Lease] | ExecuteResult:
    now = services.now()
    with db.session(services.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        if run is None:
            return ExecuteResult(run_id, "not_found", reason="no such run")
        if run.status != RunStatus.QUEUED or run.fence != fence or run.slot is None:
            return ExecuteResult(run_id, "duplicate", reason=f"run is {run.status} (fence {run.fence}), not queued "
                                                            f"with fence {fence}: nothing started")
        try:
            spec = services.config.agent(run.agent)
        except NotFoundError:
            _end_unstarted(services, session, run, RunStatus.FAILED, "agent no longer in fleet.toml")
            return ExecuteResult(run_id, "failed", reason="agent no longer configured")
        try:
            kill = killswitch.check(session, services.redis, run.agent)
        except UnavailableError as exc:
            return ExecuteResult(run_id, "deferred", reason=str(exc))  # the task sends it again later
        if kill.killed:
            _end_unstarted(services, session, run, RunStatus.KILLED, kill.describe())
            return ExecuteResult(run_id, "killed", reason=kill.describe())
        lease = Lease(run.agent, run.slot, run.id, fence)
        if not services.leases.renew(lease, services.config.fleet.lease_ttl_s):
            _end_unstarted(services, session, run, RunStatus.ARCHIVED, "lease expired before the run started")
            return ExecuteResult(run_id, "stale", reason="lease expired before start")
        claimed = session.execute(update(Run).where(
            col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED, col(Run.fence) == fence).values(
            status=RunStatus.RUNNING, attempt=Run.attempt + 1, started_at=now, heartbeat_at=now, updated_at=now,
            host=services.host, retry_at=None))
        if db.rowcount(claimed) != 1:
            session.rollback()
            return ExecuteResult(run_id, "duplicate", reason="another worker claimed the run first")
        session.refresh(run)
        store.add_event(session=session, at=now, kind="run.started", run_id=run.id, agent=run.agent,
                        attempt=run.attempt, host=services.host)
        session.commit()
    return run, spec, lease


def _end_unstarted(services: Services, session: Any, run: Run, status: RunStatus, reason: str) -> None:
    now = services.now()
    session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED).values(
        status=status, error=reason, finished_at=now, updated_at=now))
    run.status = status
    ledger.settle(session, run=run, now=now)
    store.add_event(session=session, at=now, kind=f"run.{status.value}", run_id=run.id, agent=run.agent, reason=reason)
    session.commit()
    if run.slot is not None and run.fence is not None:
        services.leases.release(Lease(run.agent, run.slot, run.id, run.fence))


# ---------------------------------------------------------------- the attempt


def _run_attempt(services: Services, run: Run, spec: AgentSpec, watcher: _Watcher) -> ProcessResult:
    env = agent_environment(run, spec)
    log_path = run_log_path(services.settings.log_dir, run.id)
    common: dict[str, Any] = {"log_path": log_path, "watch": watcher.watch, "on_started": watcher.started,
                              "grace_s": services.config.fleet.kill_grace_s,
                              "watch_interval_s": services.config.fleet.kill_poll_s,
                              "redact": secrets_of(spec, env)}
    # A retry appends to the first attempt's log: the whole story of a run stays in one file.
    append = run.attempt > 1
    if spec.poll:
        poll = run_agent(list(spec.poll), env, timeout_s=min(POLL_TIMEOUT_S, spec.timeout_s), append_log=append,
                         **common)
        if poll.exit_code != EXIT_OK or watcher.stop_reason:
            return poll
        append = True
    watcher.meter = make_parser(spec.usage_format, services.config.prices_of(spec))
    return run_agent(list(spec.command), env, timeout_s=spec.timeout_s, on_usage=watcher.usage, append_log=append,
                     parse=watcher.meter, **common)


def secrets_of(spec: AgentSpec, env: dict[str, str]) -> tuple[str, ...]:
    """The values Fleet masks in the agent's output: its key and its secret_env values."""
    names = [*spec.secret_env, *(["FLEET_AGENT_KEY"] if spec.key_file else [])]
    return tuple(env[name] for name in names if len(env.get(name, "")) >= 4)


def agent_environment(run: Run, spec: AgentSpec) -> dict[str, str]:
    """A clean environment: the agent's own key and variables, never the fleet's URLs or DSN."""
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    env["LANG"] = os.environ.get("LANG", "C.UTF-8")
    env.update(spec.env)
    for name, path in spec.secret_env.items():
        env[name] = _read_secret(path)
    if spec.key_file is not None:
        env["FLEET_AGENT_KEY"] = _read_secret(spec.key_file)
    env.update({"FLEET_RUN_ID": run.id, "FLEET_AGENT": run.agent, "FLEET_WORK_KEY": run.work_key,
                "FLEET_PAYLOAD": run.payload or "", "FLEET_ATTEMPT": str(run.attempt),
                "FLEET_PREV_RUN_ID": run.prev_run_id or ""})
    return env


def _read_secret(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def run_log_path(log_dir: Path, run_id: str) -> Path:
    """Where a run's merged output goes."""
    return log_dir / "runs" / f"{run_id}.log"


class _Watcher:
    """Called by the process runner while the agent lives: kill flag, heartbeat, running-cost guard."""

    def __init__(self, services: Services, run: Run, lease: Lease) -> None:
        self.services, self.run, self.lease = services, run, lease
        fleet = services.config.fleet
        self.heartbeat_every, self.lease_ttl = fleet.heartbeat_s, fleet.lease_ttl_s
        self.unreachable_grace = fleet.kill_unreachable_grace_s
        self.next_heartbeat = time.monotonic() + self.heartbeat_every
        self.unreachable_since: float | None = None
        self.stop_reason: str | None = None
        self.lost = False
        self.charged = 0  # micro-dollars of this attempt already booked in the ledger
        self.reserved = run.reserved_micros  # what this attempt starts with reserved
        self.meter: LineParser | None = None  # the agent command's usage parser

    def started(self, pid: int, pgid: int) -> None:
        """Record where the agent runs, so the reaper can find an orphan."""
        with db.session(self.services.engine) as session:
            session.execute(update(Run).where(col(Run.id) == self.run.id, col(Run.fence) == self.lease.fence)
                            .values(pid=pid, pgid=pgid))
            session.commit()

    def watch(self, _cost_micros: int) -> str | None:
        """Every poll interval: stop on a kill; heartbeat when due."""
        self.stop_reason = self.stop_reason or self._kill_check() or self._heartbeat_if_due()
        return self.stop_reason

    def usage(self, cost_micros: int) -> str | None:
        """Each usage line: book the new spend now, and stop the agent before it can pass a cap.

        The cap holds even when the estimate was wrong: once the run spends past its reservation
        and what the caps still allow would not cover another step like the last one, the agent
        is stopped.
        """
        if self.meter is not None and self.meter.problem:
            self.stop_reason = self.stop_reason or BAD_USAGE  # tokens Fleet cannot price are never $0
            return BAD_USAGE
        step = cost_micros - self.charged
        if step <= 0:
            return None
        services, spec = self.services, self.services.config.agents.get(self.run.agent)
        try:
            with db.session(services.engine) as session:
                ledger.charge(session, run=self.run, amount=step, now=services.now())
                self.charged = cost_micros
                current = session.get(Run, self.run.id, populate_existing=True)
                own = current.reserved_micros if current is not None else 0
                room = None if spec is None or self.run.budget_day is None else ledger.headroom(
                    session, day=self.run.budget_day, agent=self.run.agent, caps=caps_of(services, spec))
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("run.charge_failed", run_id=self.run.id, error=str(exc).splitlines()[0])
            return None  # booked at the end instead; the heartbeat's checks go on
        if room is not None and room < 0:
            alerts.alert("overspend", f"run {self.run.id} of {self.run.agent} took today's spend past a cap by "
                         f"${ledger.to_usd(-room):.2f}", agent=self.run.agent, run_id=self.run.id, over_micros=-room)
        # Within its reservation a run is covered; past it, stop while one more step still fits.
        if room is not None and cost_micros > self.reserved and room + own < step:
            self.stop_reason = "over_cap"
            return "over_cap"
        return None

    def _kill_check(self) -> str | None:
        try:
            state: killswitch.KillState | None = killswitch.check_redis(self.services.redis, self.run.agent)
            self.unreachable_since = None
        except redis.RedisError:
            # Without Redis the kill flag is read from the database mirror, but the lease cannot be
            # renewed either: past the grace another worker could take the run over, so stop first.
            self.unreachable_since = self.unreachable_since or time.monotonic()
            state = self._mirror_check()
            if time.monotonic() - self.unreachable_since > self.unreachable_grace:
                return "unreachable"
        return "killed" if state is not None and state.killed else None

    def _mirror_check(self) -> killswitch.KillState | None:
        try:
            with db.session(self.services.engine) as session:
                return killswitch.check_mirror(session, self.run.agent)
        except SQLAlchemyError:
            return None

    def _heartbeat_if_due(self) -> str | None:
        if time.monotonic() < self.next_heartbeat:
            return None
        self.next_heartbeat = time.monotonic() + self.heartbeat_every
        try:
            if not self.services.leases.renew(self.lease, self.lease_ttl):
                self.lost = True
                return "lease_lost"
        except redis.RedisError:
            pass  # the kill check's unreachable grace decides when to give up
        try:
            with db.session(self.services.engine) as session:
                owned = session.execute(update(Run).where(
                    col(Run.id) == self.run.id, col(Run.fence) == self.lease.fence,
                    col(Run.status) == RunStatus.RUNNING).values(heartbeat_at=self.services.now()))
                session.commit()
            if db.rowcount(owned) != 1:
                self.lost = True
                return "lease_lost"
        except SQLAlchemyError:
            pass
        # Re-read the durable mirror now and then: a flag Redis lost must still stop us.
        state = self._mirror_check()
        return "killed" if state is not None and state.killed else None


# ---------------------------------------------------------------- the verdict


def judge(result: ProcessResult, stop_reason: str | None, usage_problem: str | None = None) -> Verdict:
    """Map an attempt's end to a status: exit codes mean what the CLI's mean."""
    if usage_problem is not None:
        # What it spent is unknown, however it ended, and every later run would be as blind:
        # dead-letter it and pause the agent until fleet.toml or the agent is fixed.
        why = f"stopped: its usage cannot be priced ({usage_problem})"
        return Verdict(RunStatus.FAILED, why, retryable=False, breaker=Outcome.FAILURE, pause=why,
                       dead_reason="usage")
    if stop_reason in ("killed", "unreachable"):
        reason = "killed" if stop_reason == "killed" else "Redis unreachable past kill_unreachable_grace_s"
        return Verdict(RunStatus.KILLED, reason, retryable=False, breaker=Outcome.NEUTRAL)
    if stop_reason == "over_cap":
        return Verdict(RunStatus.KILLED, "stopped by the spend cap", retryable=False, breaker=Outcome.NEUTRAL)
    if result.stop_reason == "timeout":
        return Verdict(RunStatus.FAILED, "timeout", retryable=True, breaker=Outcome.FAILURE, dead_reason="timeout")
    code = result.exit_code
    pause = f"agent said it is done: {result.done_reason}" if result.done_reason else None
    if not result.started:
        return Verdict(RunStatus.FAILED, f"could not start: {result.output_tail[-200:]}", retryable=False,
                       breaker=Outcome.FAILURE, dead_reason="spawn")
    if code == EXIT_OK:
        return Verdict(RunStatus.SUCCEEDED, None, retryable=False, breaker=Outcome.SUCCESS, pause=pause)
    if code == EXIT_IDLE:
        return Verdict(RunStatus.IDLE, None, retryable=False, breaker=Outcome.NEUTRAL, pause=pause)
    if code == EXIT_TRANSIENT:
        return Verdict(RunStatus.FAILED, "transient failure (exit 75)", retryable=True, breaker=Outcome.NEUTRAL,
                       pause=pause, dead_reason="transient")
    if code == EXIT_AUTH:
        return Verdict(RunStatus.FAILED, "auth failure (exit 77): check the agent's key", retryable=False,
                       breaker=Outcome.AUTH, pause=pause, dead_reason="auth")
    if code == EXIT_CONFIG:
        return Verdict(RunStatus.FAILED, "configuration error (exit 78): agent paused", retryable=False,
                       breaker=Outcome.FAILURE, pause="agent exited 78 (configuration error)", dead_reason="config")
    return Verdict(RunStatus.FAILED, f"exit code {code}", retryable=True, breaker=Outcome.FAILURE, pause=pause)


def backoff_s(base: float, attempt: int) -> float:
    """Exponential backoff with full jitter on the upper half: base * 2^(attempt-1) * [0.5, 1.0)."""
    factor: int = 2 ** max(0, attempt - 1)  # int ** int is typed Any (a negative power is a float)
    return base * factor * (0.5 + random.random() / 2)


# ---------------------------------------------------------------- finish


def _finish(services: Services, run: Run, spec: AgentSpec, lease: Lease, result: ProcessResult, verdict: Verdict,
            requeue: Requeue, watcher: _Watcher) -> ExecuteResult:
    now = services.now()
    fleet = services.config.fleet
    retry = verdict.retryable and run.attempt < run.max_attempts
    # A failure that will not be retried needs a human: it goes to the dead-letter queue.
    dead = verdict.status == RunStatus.FAILED and not retry
    status = RunStatus.QUEUED if retry else (RunStatus.DEAD if dead else verdict.status)
    delay = backoff_s(fleet.retry_backoff_s, run.attempt) if retry else None
    with db.session(services.engine) as session:
        values: dict[str, Any] = {
            "status": status, "exit_code": result.exit_code, "error": verdict.error, "updated_at": now,
            "pid": None, "pgid": None,
        }
        if retry:
            values["retry_at"] = now + timedelta(seconds=delay or 0)
        else:
            values["finished_at"] = now
        owned = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.fence) == lease.fence,
                                                  col(Run.status) == RunStatus.RUNNING).values(**values))
        if db.rowcount(owned) != 1:
            session.rollback()
            return ExecuteResult(run.id, "stale", result.exit_code, "the run was taken over while it ran")
        run = session.get(Run, run.id, populate_existing=True) or run
        # The agent's own final figure stands, above or below what was booked as it ran (a negative
        # amount is a correction). Tokens that could not be priced cost at least the reservation.
        cost = max(result.cost_micros, watcher.reserved) if verdict.dead_reason == "usage" else result.cost_micros
        ledger.charge(session, run=run, amount=cost - watcher.charged, now=now)
        if not retry:
            ledger.settle(session, run=run, now=now)
        if dead:
            _dead_letter(session, run, result, verdict, now)
        store.add_event(session=session, at=now, kind=f"run.{'retrying' if retry else status.value}", run_id=run.id,
                        agent=run.agent, attempt=run.attempt, exit_code=result.exit_code, error=verdict.error,
                        cost_micros=cost, retry_in_s=delay)
        session.commit()
    if dead:
        alerts.alert("dead_letter", f"run {run.id} of {run.agent} was dead-lettered after {run.attempt} "
                     f"attempt(s): {verdict.error}", agent=run.agent, run_id=run.id, reason=verdict.dead_reason,
                     attempts=run.attempt, exit_code=result.exit_code)
    _after_persist(services, run, spec, lease, verdict, retry, delay, requeue)
    return ExecuteResult(run.id, status.value, result.exit_code, verdict.error, run.attempt, delay)


def _dead_letter(session: Any, run: Run, result: ProcessResult, verdict: Verdict, now: datetime) -> None:
    session.add(DeadLetter(run_id=run.id, agent=run.agent, reason=verdict.dead_reason, attempts=run.attempt,
                           exit_code=result.exit_code, last_error=verdict.error,
                           output_tail=result.output_tail[-8192:], created_at=now))
    store.add_event(session=session, at=now, kind="run.dead_lettered", run_id=run.id, agent=run.agent,
                    error=verdict.error)


def _after_persist(services: Services, run: Run, spec: AgentSpec, lease: Lease, verdict: Verdict, retry: bool,
                   delay: float | None, requeue: Requeue) -> None:
    """What follows once the outcome is safe in the database; none of it may undo that."""
    fleet = services.config.fleet
    try:
        if retry:
            services.leases.renew(lease, (delay or 0) + fleet.stale_after_s)
            requeue(run.id, lease.fence, delay or 0)
        else:
            services.leases.release(lease)
        old, new = services.breakers.record(run.agent, run.id, verdict.breaker, now=services.now().timestamp(),
                                            threshold=spec.breaker_settings(fleet)[0])
        if new != old:
            _breaker_changed(services, run, old, new)
        if verdict.pause:
            services.redis.set(keys.paused(spec.name), verdict.pause)
    except Exception as exc:  # noqa: BLE001 - the outcome is persisted; the reaper mends the rest
        log.warning("run.after_persist_failed", run_id=run.id, error=f"{exc.__class__.__name__}: {exc}")


def _breaker_changed(services: Services, run: Run, old: str, new: str) -> None:
    """Breaker transitions are events (and the open one an alert)."""
    with db.session(services.engine) as session:
        store.add_event(session=session, at=services.now(), kind=f"breaker.{new}", run_id=run.id, agent=run.agent,
                        previous=old)
        session.commit()
    log.warning("breaker.changed", agent=run.agent, previous=old, state=new, run_id=run.id)
    if new == "open":
        alerts.alert("breaker_opened", f"breaker of {run.agent} opened ({old} -> open) after run {run.id}",
                     agent=run.agent, run_id=run.id, previous=old)
