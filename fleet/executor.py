"""The executor: step 5 of the dispatch. It owns a run from `queued` to the end.

It refuses to start unless the run's status and fence still match (a redelivered or stale message
is a `duplicate` and starts nothing), reserves again for a retry (every attempt reserves before it
starts), runs the agent under the launcher in its own process group with a clean environment (as
its run_as user, in a folder of its own, when it has one: fleet/identity.py), and watches it
(fleet/watch.py: the kill flag, the proof of ownership that keeps the launcher's tether taut, the
running cost). The outcome is written fenced, and retried while the database is away
(the lease stays renewed meanwhile, so the reaper can tell "could not write" from "died"), before
anything optional happens. A retryable failure goes back to the queue once, on the same row; the
second failure is dead-lettered.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
from sqlalchemy import bindparam, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import alerts, db, identity, killflag, killswitch, ledger, logs, pause, redaction, runlog, store
from fleet.breaker import Outcome
from fleet.config import AgentSpec, read_secret
from fleet.dispatch import caps_of
from fleet.errors import ConfigError, NotFoundError, UnavailableError, first_line
from fleet.locks import Lease
from fleet.models import DeadLetter, Run, RunStatus, table_of
from fleet.process import Launch, Output, ProcessResult, run_agent
from fleet.services import Services, as_fleet_error
from fleet.usage import make_parser
from fleet.watch import Bookkeeper, Ownership, Watcher, book_lost_spend

log = logs.get(__name__)
_T = TypeVar("_T")

Requeue = Callable[[str, int, float], None]  # (run_id, fence, countdown_s)

# Exit codes shared with the CLI (DESIGN.md): what each one means for the run.
EXIT_OK, EXIT_IDLE, EXIT_TRANSIENT, EXIT_AUTH, EXIT_CONFIG = 0, 3, 75, 77, 78
POLL_TIMEOUT_S = 60.0
MOVED_ON: Literal["moved_on"] = "moved_on"  # see _write_outcome
# A lease renewed to its full TTL this recently still covers the outcome's writes as well as a renewal would:
# a run that ends sooner (a no-op, a quick refusal) skips that round trip, one of the five a run would make.
FRESH_LEASE_S = 1.0
# How long the end of an attempt tries Redis again for the breaker's count (below breaker.COUNTED_TTL_S).
REDIS_RETRY_S = 30.0

# Built once (models.table_of): every run is claimed and ended by these. (A bind parameter may not
# share a column's name in an UPDATE: theirs start with p_.)
_RUNS = table_of(Run)
# The heartbeat is by the database's clock, as the reaper compares it: PostgreSQL's now() in the UPDATE itself
# (no round trip to read it first); SQLite's clock is read in-process and bound, in the column's own text form.
_CLAIM = {dialect: select(Run).from_statement(
    update(_RUNS).where(_RUNS.c.id == bindparam("p_id"), _RUNS.c.status == RunStatus.QUEUED,
                        _RUNS.c.fence == bindparam("p_fence"))
    .values(status=RunStatus.RUNNING, attempt=_RUNS.c.attempt + 1, started_at=bindparam("p_now"),
            attempt_cost_micros=0, heartbeat_at=heartbeat, updated_at=bindparam("p_now"),
            host=bindparam("p_host"), retry_at=None)
    .returning(*_RUNS.c)).execution_options(populate_existing=True)
    for dialect, heartbeat in (("postgresql", ledger.clock("postgresql")), ("sqlite", bindparam("p_heartbeat_at")))}
# Its own attempt only: a retry keeps its fence, so an outcome written again after its first commit's answer
# was lost (while the reaper re-sent the retry and another worker claimed it) must not end the next attempt.
_OWNED = update(_RUNS).where(_RUNS.c.id == bindparam("p_id"), _RUNS.c.fence == bindparam("p_fence"),
                             _RUNS.c.attempt == bindparam("p_attempt"), _RUNS.c.status == RunStatus.RUNNING)
_OUTCOME: dict[str, Any] = {"status": bindparam("p_status"), "exit_code": bindparam("p_exit_code"),
                            "error": bindparam("p_error"), "updated_at": bindparam("p_now"), "pid": None, "pgid": None}
_ENDED, _RETRYING = (  # the row comes back with the UPDATE, locked by it, in place of a read after it
    select(Run).from_statement(outcome.returning(*_RUNS.c)).execution_options(populate_existing=True)
    for outcome in (_OWNED.values(**_OUTCOME, finished_at=bindparam("p_now")),
                    _OWNED.values(**_OUTCOME, retry_at=bindparam("p_retry_at"), queued_at=bindparam("p_queued_at"),
                                  sends=1)))


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
    claiming = time.monotonic()  # the claim renews the lease to its full TTL after this
    try:
        started = _claim(services, run_id, fence)
    except SQLAlchemyError as exc:
        # Nothing has started and nothing was committed: a database that stalls, restarts or holds its lock past
        # the timeout is a blip, not a failure. Deferred, the message is sent again shortly (a raise would have
        # its message acknowledged as failed, and the run would wait for the reaper's resend window).
        failure = as_fleet_error(exc)
        if not isinstance(failure, UnavailableError):
            raise  # a schema or credentials problem: loud, retrying does not help
        return ExecuteResult(run_id, "deferred", reason=f"the database could not take the claim yet: {failure}")
    if isinstance(started, ExecuteResult):
        return started
    run, spec, lease, room = started
    log.info("run.started", run_id=run.id, agent=run.agent, attempt=run.attempt, fence=fence)
    fleet = services.config.fleet
    ownership = Ownership(fleet.ownership_window_s)
    # Before the attempt opens its log: a retry on this host appends to what its file holds already.
    shipper = runlog.Shipper.for_attempt(services.engine, run.id, run.attempt,
                                         run_log_path(services.settings.log_dir, run.id))
    books = Bookkeeper(services, run, lease, caps_of(services, spec), ownership, room, shipper)
    watcher = Watcher(services, run, lease, ownership, books, lease_renewed_at=claiming)
    books.start()
    try:
        result = _run_attempt(services, run, spec, watcher, ownership)
    finally:
        books.finish()
        _ship_rest(services, None if watcher.lost or watcher.lease_renewed_within(FRESH_LEASE_S) else lease, shipper)
    if watcher.lost:
        # The money first: a Redis error at the release must not keep the spend from the ledger.
        _book_orphaned_spend(services, run, result.cost_micros - books.owned)
        with contextlib.suppress(redis.RedisError):  # the key expires on its own otherwise
            services.leases.release(lease)  # only if the key still holds our fence
        return ExecuteResult(run.id, "stale", result.exit_code, "lease lost: another owner took the run over")
    stop = watcher.stop_reason or ("lease_lapsed" if ownership.lapsed() and result.exit_code else None)
    verdict = judge(result, stop, watcher.meter.problem if watcher.meter else None)
    # The agent's own final figure stands, above or below what was booked as it ran (a negative
    # amount is a correction). Tokens that could not be priced cost at least the reservation.
    cost = max(result.cost_micros, watcher.reserved) if verdict.dead_reason == "usage" else result.cost_micros
    return _finish(services, run, spec, lease, result, verdict, requeue, cost, books.owned)


def _ship_rest(services: Services, renew: Lease | None, shipper: runlog.Shipper) -> None:
    """The rest of the log, before the outcome is written (so a follower sees it all by the end). Our lease
    is renewed first (`renew`; None: another owner's now, or renewed a moment ago): a database slow to answer
    must not let the reaper mistake this owner for a dead one."""
    if renew is not None:
        with contextlib.suppress(redis.RedisError):
            services.leases_fast.renew(renew, services.config.fleet.lease_ttl_s)
    shipper.ship(services.now(), everything=True)


def _book_orphaned_spend(services: Services, run: Run, total: int) -> None:
    """An attempt that lost its run still spent what it reported: book it (`total`: what it spent beyond what it
    booked as the owner), without the new owner's reservation, and once (watch.book_lost_spend's receipts).
    Retried while the database is away, as an outcome is: money lost from the ledger is money the caps stop
    counting."""
    if total <= 0:
        return

    def book() -> None:
        with db.session(services.engine) as session:
            book_lost_spend(session, run=run, total=total, now=services.now())
            session.commit()

    with contextlib.suppress(UnavailableError):  # logged with the amount: the ledger could not be told of it
        _retrying_database(services, run, "orphaned_spend", book, micros=total)


def _retrying_database(services: Services, run: Run, what: str, write: Callable[[], _T],
                       wait: Callable[[float], None] = time.sleep, *, within_s: float | None = None,
                       **detail: Any) -> _T:
    """`write` until the database takes it, for up to `within_s` (outcome_retry_s by default; `wait` between
    tries: the outcome's keeps its lease alive). Raises UnavailableError, logged as `run.{what}_lost` (with
    `detail`), when it never did."""
    within_s = services.config.fleet.outcome_retry_s if within_s is None else within_s
    deadline = time.monotonic() + within_s
    pause = 0.2
    while True:
        try:
            return write()
        except SQLAlchemyError as exc:
            if time.monotonic() + pause > deadline:
                log.error(f"run.{what}_lost", run_id=run.id, error=first_line(exc), **detail)
                raise UnavailableError(f"could not write the {what.replace('_', ' ')} of run {run.id} for "
                                       f"{within_s:.0f} s: {first_line(exc)}") from None
            log.warning(f"run.{what}_write_failed", run_id=run.id, error=first_line(exc), retry_in_s=pause, **detail)
            wait(pause)
            pause = min(pause * 2, 5.0)


# ---------------------------------------------------------------- claim


def _claim(services: Services, run_id: str, fence: int) -> tuple[Run, AgentSpec, Lease, int | None] | ExecuteResult:
    now = services.now()
    with db.session(services.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        if run is None:
            return ExecuteResult(run_id, "not_found", reason="no such run")
        if run.status != RunStatus.QUEUED or run.fence != fence or run.slot is None:
            return ExecuteResult(run_id, "duplicate", reason=f"run is {run.status} (fence {run.fence}), not queued "
                                                            f"with fence {fence}: nothing started")
        spec = _spec_or_end(services, session, run)
        if isinstance(spec, ExecuteResult):
            return spec
        lease = Lease(run.agent, run.slot, run.id, fence)
        try:  # the kill flags and the lease renewal in one round trip; the mirror in this transaction
            killed_scope, flag, renewed = services.admissions.claim(lease, ttl_s=services.config.fleet.lease_ttl_s)
        except redis.RedisError as exc:
            return ExecuteResult(run_id, "deferred", reason=f"Redis unreachable ({exc.__class__.__name__})")
        kill = (killswitch.parse_flag(killed_scope, flag) if killed_scope is not None
                else killswitch.check_mirror(session, run.agent))
        if kill.killed:
            if killed_scope is None:
                killswitch.restore(session, services.redis)  # Redis lost a flag the mirror still holds
            _end_unstarted(services, session, run, RunStatus.KILLED, kill.describe())
            return ExecuteResult(run_id, "killed", reason=kill.describe())
        if not renewed:
            # Its slot lapsed and another run holds it now: it stays queued, and the reaper sends it
            # again once a slot is free. Nothing is archived in silence.
            return ExecuteResult(run_id, "waiting", reason="its slot is held by another run; the reaper re-sends it")
        if run.attempt >= 1 and not _reserve_retry(session, services, spec, run, now):
            session.rollback()
            return _end_over_cap(services, session, run, spec)
        # The claimed row comes back with the UPDATE (RETURNING), in place of a read after it.
        dialect = session.get_bind().dialect.name
        params = {"p_id": run.id, "p_fence": fence, "p_now": now, "p_host": services.host}
        if dialect == "sqlite":
            params["p_heartbeat_at"] = ledger.database_now(session)
        claimed = db.execute(session, _CLAIM[dialect], params).scalars().first()
        if claimed is None:
            session.rollback()
            return ExecuteResult(run_id, "duplicate", reason="another worker claimed the run first")
        run = claimed
        room = None if run.budget_day is None else ledger.headroom(
            session, day=run.budget_day, agent=run.agent, caps=caps_of(services, spec))
        if not _commit_claim(services, session, run, fence, now):
            return ExecuteResult(run_id, "deferred", reason="the claim's commit failed: it is tried again shortly")
    return run, spec, lease, room


def _spec_or_end(services: Services, session: Session, run: Run) -> AgentSpec | ExecuteResult:
    """The run's agent; a run whose agent left fleet.toml ends dead, unless the file is still settling (the
    agent may be in it: `fleet dispatch` read it as it started) and the execute is deferred."""
    try:
        return services.config.agent(run.agent)
    except NotFoundError:
        if services.config_change_pending():
            return ExecuteResult(run.id, "deferred", reason="fleet.toml changed a moment ago: not taken yet")
        _end_unstarted(services, session, run, RunStatus.DEAD, "agent no longer in fleet.toml", "agent_removed")
        return ExecuteResult(run.id, "dead", reason="agent no longer configured")


def _commit_claim(services: Services, session: Session, run: Run, fence: int, now: datetime) -> bool:
    """The claim's event and commit; False when it did not commit (the execute is deferred)."""
    claim = uuid.uuid4().hex  # this claim's own mark: a commit whose answer was lost is known by it
    store.add_event(session=session, at=now, kind="run.started", run_id=run.id, agent=run.agent,
                    attempt=run.attempt, fence=fence, host=services.host, claim=claim)
    try:
        session.commit()
    except SQLAlchemyError as exc:
        log.warning("run.claim_commit_failed", run_id=run.id, error=first_line(exc))
        return _claim_landed(services, run, fence, claim)
    return True


def _claim_landed(services: Services, run: Run, fence: int, claim: str) -> bool:
    """Whether a claim whose commit raised did commit (its answer lost), asked for half a lease TTL: the lease
    the claim renewed is ours that long. Unanswered, it is taken as not committed and the execute deferred: if
    it had committed, the reaper takes the run over, and nothing started twice."""
    def ours() -> bool:
        with db.session(services.engine) as session:
            started = store.attempt_events(session=session, run_id=run.id, kind="run.started",
                                           attempt=run.attempt, fence=fence)
        return any(event.get("claim") == claim for event in started)

    try:
        return _retrying_database(services, run, "claim", ours, within_s=services.config.fleet.lease_ttl_s / 2)
    except UnavailableError:
        return False


def _reserve_retry(session: Session, services: Services, spec: AgentSpec, run: Run, now: datetime) -> bool:
    """A retry reserves its estimate again, on today's budget day, before it may start (what the attempt
    before it left reserved goes back first: an abandoned attempt was never settled)."""
    estimate = ledger.to_micros(spec.est_cost_usd) or 0
    ledger.settle(session, run=run, now=now)
    day = ledger.budget_day(session, services.config.fleet.timezone)
    if not ledger.reserve(session, day=day, agent=spec.name, amount=estimate, caps=caps_of(services, spec), now=now):
        return False
    moved: dict[str, Any] = {}
    if run.budget_day is not None and day != run.budget_day:  # after midnight: what it spent stays on its day
        moved = {"prior_day": run.budget_day, "prior_cost_micros": run.cost_micros}
    session.execute(update(Run).where(col(Run.id) == run.id).values(
        budget_day=day, reserved_micros=estimate, settled_at=None, **moved))
    return True


def _end_over_cap(services: Services, session: Session, run: Run, spec: AgentSpec) -> ExecuteResult:
    """The retry no longer fits under a cap: the run ends dead (`over_cap`) and never runs over."""
    error = "over_cap: the retry's estimate no longer fits under today's cap"
    if not _end_unstarted(services, session, run, RunStatus.DEAD, error, "over_cap"):
        return ExecuteResult(run.id, "duplicate", reason="the run moved on before it could be ended")
    alerts.alert("dead_letter", f"run {run.id} of {run.agent} was dead-lettered: {error}", agent=run.agent,
                 run_id=run.id, reason="over_cap", attempts=run.attempt)
    return ExecuteResult(run.id, "dead", reason=error, attempt=run.attempt)


def _end_unstarted(services: Services, session: Session, run: Run, status: RunStatus, reason: str,
                   dead_reason: str | None = None) -> bool:
    """End a queued run that will not start; False (and nothing changed) if it is no longer queued."""
    now = services.now()
    ended = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED,
                                              col(Run.fence) == run.fence)
                            .values(status=status, error=reason, finished_at=now, updated_at=now))
    if db.rowcount(ended) != 1:
        session.rollback()
        return False
    run.status = status
    ledger.settle(session, run=run, now=now)
    if dead_reason is not None:
        session.add(DeadLetter(run_id=run.id, agent=run.agent, reason=dead_reason, attempts=run.attempt,
                               last_error=reason, created_at=now))
        store.add_event(session=session, at=now, kind="run.dead_lettered", run_id=run.id, agent=run.agent,
                        error=reason)
    store.add_event(session=session, at=now, kind=f"run.{status.value}", run_id=run.id, agent=run.agent, reason=reason)
    session.commit()
    give_back_ended(services, run)
    return True


def give_back_ended(services: Services, run: Run) -> None:
    """What a run ended for good held in Redis: its slot lease, and a half-open trial (one that never ran, or
    never finished, frees the breaker). Best effort, since a Redis error must not stop the caller's alert: a
    lease not given back lapses on its own, and the watchdog frees a trial whose run has ended."""
    with contextlib.suppress(redis.RedisError):
        if run.slot is not None and run.fence is not None:
            services.leases.release(Lease(run.agent, run.slot, run.id, run.fence))
        services.breakers.forfeit(run.agent, run.id)


# ---------------------------------------------------------------- the attempt


def _run_attempt(services: Services, run: Run, spec: AgentSpec, watcher: Watcher,
                 ownership: Ownership) -> ProcessResult:
    log_path = run_log_path(services.settings.log_dir, run.id)
    # A retry appends to the first attempt's log: the whole story of a run stays in one file.
    append = run.attempt > 1
    try:
        account = agent_account(services, spec)
        env = agent_environment(run, spec, account)
    except ConfigError as exc:
        log.error("run.refused", run_id=run.id, agent=run.agent, error=str(exc))
        return _refused(log_path, append, redaction.known_secrets(services.settings, services.config), str(exc))
    redact = secrets_of(services, spec, env)
    common: dict[str, Any] = {"log_path": log_path, "watch": watcher.watch, "on_started": watcher.started,
                              "may_start": watcher.may_start,
                              "grace_s": services.config.fleet.kill_grace_s,
                              "watch_interval_s": services.config.fleet.kill_poll_s, "redact": redact}
    tag = f"{run.id}:{run.fence}"
    creds, workdir = (account.creds, account.home) if account is not None else (None, None)
    if spec.poll:
        poll = run_agent(list(spec.poll), env, timeout_s=min(POLL_TIMEOUT_S, spec.timeout_s), append_log=append,
                         launch=Launch(tether=ownership.tether(), creds=creds, tag=tag, workdir=workdir), **common)
        if poll.exit_code != EXIT_OK or watcher.stop_reason:
            return poll
        append = True
    watcher.meter = make_parser(spec.usage_format, services.config.prices_of(spec))
    return run_agent(list(spec.command), env, timeout_s=spec.timeout_s, on_usage=watcher.usage, append_log=append,
                     launch=Launch(tether=ownership.tether(), creds=creds, tag=tag, workdir=workdir),
                     parse=watcher.meter, **common)


def agent_account(services: Services, spec: AgentSpec) -> identity.Account | None:
    """The user and folder the agent runs as and in (None: the worker's own user, as before run_as);
    ConfigError when it cannot run as its run_as here: never as the worker's user instead."""
    name = spec.user_name(services.config.fleet)
    return None if name is None else identity.account(spec.name, name, services.settings.agent_homes)


def _refused(log_path: Path, append: bool, redact: tuple[str, ...], why: str) -> ProcessResult:
    """An attempt that must not start for a configuration reason: it ends as an agent exiting 78 would
    (dead letter `config`, the agent paused), with the reason in its log."""
    output = Output(log_path, max_log_bytes=2**16, tail_bytes=2**14, append=append, redact=redact)
    try:
        output.write(f"fleet: not started: {why}\n".encode())
    finally:
        output.close()
    return ProcessResult(exit_code=EXIT_CONFIG, stop_reason=None, cost_micros=0, input_tokens=0, output_tokens=0,
                         done_reason=None, output_tail=output.tail(), pid=None, pgid=None,
                         log_bytes=output.log_bytes, started=True)


def secrets_of(services: Services, spec: AgentSpec, env: dict[str, str]) -> tuple[str, ...]:
    """The values Fleet masks in the agent's output: every secret it knows (the fleet's own, every
    agent's key and secret_env values), this agent's as it was just handed them included."""
    names = [*spec.secret_env, *(["FLEET_AGENT_KEY"] if spec.key_file else [])]
    return redaction.known_secrets(services.settings, services.config, *(env[name] for name in names if name in env))


def agent_environment(run: Run, spec: AgentSpec, account: identity.Account | None = None) -> dict[str, str]:
    """A clean environment: the agent's own key and variables, never the fleet's URLs or DSN. The key
    and secret_env files are read here, by the worker: the agent's own user needs no access to them.
    ConfigError when one of them cannot be read or is empty: the agent is then not started at all."""
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    env["LANG"] = os.environ.get("LANG", "C.UTF-8")
    if account is not None:
        env.update(account.environment())
    env.update(spec.env)
    for name, path in spec.secret_env.items():
        env[name] = read_secret(path)
    if spec.key_file is not None:
        env["FLEET_AGENT_KEY"] = read_secret(spec.key_file)
    env.update({"FLEET_RUN_ID": run.id, "FLEET_AGENT": run.agent, "FLEET_WORK_KEY": run.work_key,
                "FLEET_PAYLOAD": run.payload or "", "FLEET_ATTEMPT": str(run.attempt),
                "FLEET_PREV_RUN_ID": run.prev_run_id or ""})
    return env


def run_log_path(log_dir: Path, run_id: str) -> Path:
    """Where a run's merged output goes."""
    return log_dir / "runs" / f"{run_id}.log"


# ---------------------------------------------------------------- the verdict

STOPPED_BY_CAP = "stopped by the spend cap"


# How an attempt that Fleet stopped ends, by the stop's reason.
STOP_VERDICTS = {
    "killed": Verdict(RunStatus.KILLED, "killed", retryable=False, breaker=Outcome.NEUTRAL),
    # Stopped because no kill could have reached it, not because one did (a host cut off, Redis down):
    # retried like a lapsed lease. The retry's claim reads the kill flags first, and cannot start while
    # Redis is away, so a kill thrown meanwhile still ends the run killed.
    "unreachable": Verdict(RunStatus.FAILED, "stopped: Redis unreachable past kill_unreachable_grace_s (a kill "
                           "could not have reached it)", retryable=True, breaker=Outcome.NEUTRAL,
                           dead_reason="unreachable"),
    "over_cap": Verdict(RunStatus.KILLED, STOPPED_BY_CAP, retryable=False, breaker=Outcome.NEUTRAL),
    "lease_lapsed": Verdict(RunStatus.FAILED, "stopped: its worker could not prove it still owned the run (stopped, "
                            "wedged or cut off) before the lease could lapse", retryable=True,
                            breaker=Outcome.NEUTRAL, dead_reason="lease_lapsed"),
}


def judge(result: ProcessResult, stop_reason: str | None, usage_problem: str | None = None) -> Verdict:
    """Map an attempt's end to a status: exit codes mean what the CLI's mean."""
    if usage_problem is not None:
        # What it spent is unknown, however it ended, and every later run would be as blind:
        # dead-letter it and pause the agent until fleet.toml or the agent is fixed.
        why = f"stopped: its usage cannot be priced ({usage_problem})"
        return Verdict(RunStatus.FAILED, why, retryable=False, breaker=Outcome.FAILURE, pause=why,
                       dead_reason="usage")
    stopped = STOP_VERDICTS.get(stop_reason or "")
    if stopped is not None:
        return stopped
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
            requeue: Requeue, cost: int, owned: int) -> ExecuteResult:
    """Write the outcome and book the attempt's `cost` (the agent's final figure; `owned` is what the
    bookkeeper booked as the run's owner as it ran); while the database is away, keep the lease and try again
    (bounded)."""
    fleet = services.config.fleet
    retry = verdict.retryable and run.attempt < run.max_attempts
    delay = backoff_s(fleet.retry_backoff_s, run.attempt) if retry else None
    write = partial(_write_outcome, services, run, spec, lease, result, verdict, retry, delay, cost)
    written = _retrying_database(services, run, "outcome", write, wait=partial(_wait_keeping, services, lease))
    if written is None:
        _book_orphaned_spend(services, run, cost - owned)
        with contextlib.suppress(redis.RedisError):  # _ship_rest renewed it: give it back, if it is still ours
            services.leases.release(lease)
        return ExecuteResult(run.id, "stale", result.exit_code, "the run was taken over while it ran")
    if written == MOVED_ON:
        return ExecuteResult(run.id, "stale", result.exit_code, "its outcome was written before; the run has "
                                                                "moved on since")
    status, dead, over = written
    if over > 0:  # the guard stopped it, but one report had already passed a cap: say so (the bookkeeper may not have)
        alerts.alert("overspend", f"run {run.id} of {run.agent} took today's spend past a cap by "
                     f"{ledger.money(ledger.to_usd(over))}", agent=run.agent, run_id=run.id, over_micros=over)
    if dead:
        alerts.alert("dead_letter", f"run {run.id} of {run.agent} was dead-lettered after {run.attempt} "
                     f"attempt(s): {verdict.error}", agent=run.agent, run_id=run.id, reason=verdict.dead_reason,
                     attempts=run.attempt, exit_code=result.exit_code)
    _after_persist(services, run, spec, lease, verdict, retry, delay, requeue)
    return ExecuteResult(run.id, status.value, result.exit_code, verdict.error, run.attempt, delay)


def _wait_keeping(services: Services, lease: Lease, seconds: float) -> None:
    """Wait, renewing the lease every heartbeat: while the outcome waits for the database, the reaper
    must see a live owner that cannot write, not a dead one."""
    fleet = services.config.fleet
    until = time.monotonic() + seconds
    while True:
        with contextlib.suppress(redis.RedisError):
            services.leases.renew(lease, fleet.lease_ttl_s)
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, fleet.heartbeat_s))


def _write_outcome(services: Services, run: Run, spec: AgentSpec, lease: Lease, result: ProcessResult,
                   verdict: Verdict, retry: bool, delay: float | None,
                   cost: int) -> tuple[RunStatus, bool, int] | Literal["moved_on"] | None:
    """One fenced attempt at writing the outcome: (status, dead-lettered, micro-dollars over a cap once
    booked), None when taken over, MOVED_ON when an earlier try was written and the run has moved on since.

    An earlier try whose commit reached the database although its answer did not (an ambiguous
    commit) is recognised by the outcome event it left: our kind, our attempt, our fence.
    """
    now = services.now()
    dead = verdict.status == RunStatus.FAILED and not retry
    status = RunStatus.QUEUED if retry else (RunStatus.DEAD if dead else verdict.status)
    kind = f"run.{'retrying' if retry else status.value}"  # the outcome's event
    with db.session(services.engine) as session:
        values: dict[str, Any] = {"p_status": status, "p_exit_code": result.exit_code, "p_error": verdict.error,
                                  "p_now": now, "p_id": run.id, "p_fence": lease.fence, "p_attempt": run.attempt}
        if retry:
            # By the database's clock, as the reaper reads them: a host whose clock runs ahead must not
            # hide its retry from the resend (its Celery countdown is by its own clock, and may be held).
            database_now = ledger.database_now(session)
            values.update(p_retry_at=database_now + timedelta(seconds=delay or 0), p_queued_at=database_now)
        fresh = db.execute(session, _RETRYING if retry else _ENDED, values).scalars().first()
        if fresh is None:
            current = session.get(Run, run.id)
            # Our own earlier commit, whose answer was lost, is known by its event: committed with the row, and
            # only ours carries our fence (the reaper's own `run.retrying` of this attempt has the new fence, and
            # its dead letter keeps our fence in the row, so the row alone cannot tell).
            ours = store.has_event(session=session, run_id=run.id, kind=kind, attempt=run.attempt, fence=lease.fence)
            still = current is not None and (current.fence, current.attempt, current.status) == (
                lease.fence, run.attempt, status)
            session.rollback()
            if not ours:
                return None
            if not still:
                return MOVED_ON  # booked by that commit; what follows it belongs to the run's new owner now
            # Written, and its alert never went (it goes after the commit): a dead letter still raises one.
            return status, dead, 0
        # The booking and the settlement work on the row the UPDATE returned.
        ledger.book_attempt(session, run=fresh, total=cost, now=now, final=True, current=fresh)
        ledger.settle(session, run=fresh, now=now, current=fresh)  # a retry reserves again when it starts
        # A run the guard stopped may have passed a cap with its last report: what it booked tells.
        room = None if fresh.budget_day is None or verdict.error != STOPPED_BY_CAP else ledger.headroom(
            session, day=fresh.budget_day, agent=run.agent, caps=caps_of(services, spec))
        if dead:
            _dead_letter(session, fresh, result, verdict, now)
        if verdict.pause:  # the agent's own pause, kept with the outcome that asks for it (Redis follows)
            pause.mirror(session, scope=spec.name, reason=_own_pause_reason(verdict), actor=f"agent:{run.id}", now=now)
        store.add_event(session=session, at=now, kind=kind, run_id=run.id,
                        agent=run.agent, attempt=run.attempt, exit_code=result.exit_code, error=verdict.error,
                        cost_micros=result.cost_micros, retry_in_s=delay, fence=lease.fence)
        session.commit()
    return status, dead, 0 if room is None else max(0, -room)


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
    threshold = spec.breaker_settings(fleet)[0]
    if verdict.pause:  # in force already (its mirror came with the outcome); the flag lets ticks see it at once
        with contextlib.suppress(redis.RedisError, SQLAlchemyError):  # a missing flag is put back by a check
            pause.raise_mirrored_flag(services.engine, services.redis, scope=spec.name,
                                      reason=_own_pause_reason(verdict), actor=f"agent:{run.id}", now=services.now())
    if retry:
        try:
            services.leases.renew(lease, (delay or 0) + fleet.queued_lease_ttl_s)
            requeue(run.id, lease.fence, delay or 0)
        except Exception as exc:  # noqa: BLE001 - the run is queued in the database: the reaper sends it again
            log.warning("run.after_persist_failed", run_id=run.id, error=f"{exc.__class__.__name__}: {exc}")
    # The breaker's count lives in Redis alone: tried again through a blip (each is counted once per attempt,
    # however often it is asked, and answers the same transition).
    def count() -> tuple[str, str]:
        if retry:
            return services.breakers.record(run.agent, run.id, verdict.breaker, threshold=threshold,
                                            attempt=run.attempt)
        _, old, new = services.admissions.finish(lease, verdict.breaker, threshold=threshold, attempt=run.attempt)
        return old, new  # the lease freed and the outcome counted in one round trip

    try:
        old, new = _retrying_redis(run, "breaker_count", count)
        if new != old:
            breaker_changed(services, run, old, new)
    except Exception as exc:  # noqa: BLE001 - the outcome is persisted; a lease not freed lapses on its own
        log.warning("run.after_persist_failed", run_id=run.id, error=f"{exc.__class__.__name__}: {exc}")


def _retrying_redis(run: Run, what: str, call: Callable[[], _T], within_s: float = REDIS_RETRY_S) -> _T:
    """`call` (safe to repeat) until Redis answers, for up to `within_s`: a restart or a failover must not lose
    what only Redis keeps. Raises the last error when it never did."""
    deadline = time.monotonic() + within_s
    pause = 0.2
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning(f"run.{what}_failed", run_id=run.id, error=first_line(exc), retry_in_s=pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _own_pause_reason(verdict: Verdict) -> str:
    """The operator's pause, by the agent's own hand (`fleet resume AGENT` lifts it), for a reason the
    mirror keeps whole."""
    return (verdict.pause or "").replace("\x00", "")[:killflag.MAX_REASON]


def breaker_changed(services: Services, run: Run, old: str, new: str) -> None:
    """Breaker transitions are events (and the open one an alert)."""
    with db.session(services.engine) as session:
        store.add_event(session=session, at=services.now(), kind=f"breaker.{new}", run_id=run.id, agent=run.agent,
                        previous=old)
        session.commit()
    log.warning("breaker.changed", agent=run.agent, previous=old, state=new, run_id=run.id)
    # Alerted when it opens from closed: a failed half-open trial only says it is still failing (the
    # event above records it), and at every cool-down all night that would be a storm.
    if new == "open" and old == "closed":
        alerts.alert("breaker_opened", f"breaker of {run.agent} opened ({old} -> open) after run {run.id}",
                     agent=run.agent, run_id=run.id, previous=old)


