"""The watchdog: a zero-token health check of the whole fleet. It never starts an agent.

Each check is green, amber or red with a reason; the verdict is the worst of them and is stored.
It heals two known failures itself: a lease still held for a run that finished (an orphaned lock)
and a kill flag that Redis lost but the database still has. Idle workers with empty queues are
healthy: liveness means a canary came back through each queue, not that work is flowing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import redis
from sqlalchemy import func
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from fleet import alerts, db, keys, killswitch, ledger, orphans, tenancy
from fleet.errors import first_line
from fleet.locks import Lease
from fleet.models import TERMINAL, DeadLetter, Run, RunEvent, RunStatus, WatchdogVerdict
from fleet.services import Services

GREEN, AMBER, RED = "green", "amber", "red"
_RANK = {GREEN: 0, AMBER: 1, RED: 2}
QUEUES = ("dispatch", "agents")
CANARY_DEADLINE_S = 60.0  # a canary not back within this is a queue nobody consumes
# A canary that came back longer ago than this proves nothing about now (the watchdog sends one a minute).
CANARY_FRESH_S = 180.0
BEAT_SILENT_S = 180.0  # how late a due slot may be before beat counts as silent
DISK_AMBER, DISK_RED = 1 << 30, 100 << 20

CanarySender = Callable[[str, str], None]  # (queue, sent_at): send one canary through a queue


@dataclass(frozen=True)
class Check:
    """One check's colour and reason."""

    name: str
    status: str
    reason: str


@dataclass
class Verdict:
    """A whole watchdog pass."""

    status: str
    checks: list[Check]
    healed: list[str] = field(default_factory=list)
    at: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)


def worst(statuses: list[str]) -> str:
    """The most severe colour."""
    return max(statuses, key=_RANK.__getitem__, default=GREEN)


def run_watchdog(services: Services, send_canary: CanarySender | None, *, deadline_s: float = CANARY_DEADLINE_S,
                 store_verdict: bool = True) -> Verdict:
    """Check everything, heal what is known, send fresh canaries, store the verdict."""
    now = services.now()
    healed = heal(services)
    # Redis checks first and apart: on SQLite every transaction holds the write lock, which must
    # not wait on a round trip per agent.
    checks = [
        *[canary_check(services.redis, q, now, deadline_s) for q in QUEUES],
        beat_check(services, now),
        backlog_check(services.redis),
        orphan_check(services.redis),
        *disk_checks(services),
        tenancy_check(services),
    ]
    breakers = breaker_states(services)
    with db.session(services.engine) as session:
        checks[3:3] = [stuck_check(services, session, now), dlq_check(session, now), spend_check(services, session),
                       kill_check(session), breaker_check(services, session, breakers, now)]
        previous = latest(session)
        red_since = red_spell_began(session) if previous is not None and previous.status == RED else None
    verdict = Verdict(worst([c.status for c in checks]), checks, healed, now.isoformat())
    # On the transition (the previous verdict is in the database, shared by beat's and cron's watchdogs), then
    # again every RED_REMINDER_S while it stays red.
    if verdict.status == RED:
        first = previous is None or previous.status != RED
        if first or _reminder_due(red_since, previous, now):
            red = [f"{c.name}: {c.reason}" for c in checks if c.status == RED]
            alerts.alert("watchdog_red", ("watchdog red: " if first else "watchdog still red: ") + "; ".join(red),
                         host=services.host, checks=red)
    if send_canary is not None:
        for queue in QUEUES:
            send_canaries(services.redis, send_canary, queue, now)
    if store_verdict:
        with db.session(services.engine) as session:
            session.add(WatchdogVerdict(at=now, status=verdict.status, host=services.host,
                                        checks=json.dumps(verdict.to_json()["checks"])))
            session.commit()
    return verdict


RED_REMINDER_S = 3600  # while red, the alert comes again this often (sentry-sdk drops an event it cannot deliver)


def red_spell_began(session: Session) -> datetime | None:
    """When the watchdog last turned red: the first red verdict after the last one that was not."""
    last_ok = session.exec(select(func.max(WatchdogVerdict.id)).where(WatchdogVerdict.status != RED)).one()
    first_red = select(func.min(WatchdogVerdict.id)).where(WatchdogVerdict.status == RED)
    if last_ok is not None:
        first_red = first_red.where(col(WatchdogVerdict.id) > last_ok)
    began = session.exec(first_red).one()
    verdict = session.get(WatchdogVerdict, began) if began is not None else None
    return verdict.at if verdict is not None else None


def _reminder_due(began: datetime | None, previous: WatchdogVerdict | None, now: datetime) -> bool:
    """Whether this pass, still red, crosses a whole RED_REMINDER_S since the spell began (the previous one did
    not): one reminder an hour however often the watchdog runs, from the verdicts alone (a Redis restart keeps it)."""
    if began is None or previous is None:
        return False
    def intervals(at: datetime) -> int:
        return int(max(0.0, (at - began).total_seconds()) // RED_REMINDER_S)

    return intervals(now) > intervals(previous.at)


# ---------------------------------------------------------------- canaries


def send_canaries(client: redis.Redis, send: CanarySender, queue: str, now: datetime) -> None:
    """Send a canary unless one is still out and within its deadline (never pile them up)."""
    # Clients are built with decode_responses=True: values are str, never bytes.
    sent = cast(str | None, client.get(keys.canary_sent(queue)))
    back = client.get(keys.canary(queue))
    if sent and sent != back and (now - datetime.fromisoformat(sent)).total_seconds() < CANARY_DEADLINE_S:
        return
    stamp = now.isoformat()
    client.set(keys.canary_sent(queue), stamp)
    send(queue, stamp)


def canary_returned(client: redis.Redis, queue: str, sent_at: str) -> None:
    """Called by the canary task: the canary sent at `sent_at` came back through `queue`."""
    client.set(keys.canary(queue), sent_at)
    client.set(keys.canary_seen(queue), datetime.now(UTC).isoformat())


def canary_check(client: redis.Redis, queue: str, now: datetime, deadline_s: float,
                 fresh_s: float = CANARY_FRESH_S) -> Check:
    """Red when the last canary through `queue` is overdue, or came back too long ago to count."""
    name = f"consumption:{queue}"
    sent, back = cast(str | None, client.get(keys.canary_sent(queue))), client.get(keys.canary(queue))
    if not sent:
        return Check(name, AMBER, "no canary sent yet")
    age = (now - datetime.fromisoformat(sent)).total_seconds()
    if sent == back:
        limit = max(fresh_s, deadline_s)
        if age > limit:
            return Check(name, RED, f"the last canary came back {age:.0f}s ago (limit {limit:.0f}s): nothing shows "
                                    f"that a worker consumes {queue!r} now; is the watchdog sending canaries?")
        return Check(name, GREEN, f"last canary came back ({age:.0f}s ago)")
    if age > deadline_s:
        return Check(name, RED, f"canary sent {age:.0f}s ago has not come back: no worker consumes {queue!r}")
    return Check(name, GREEN, f"canary in flight for {age:.0f}s")


# ---------------------------------------------------------------- the other checks


def beat_check(services: Services, now: datetime) -> Check:
    """Beat is alive when it ticked every slot that fell due more than BEAT_SILENT_S ago (only matters
    when some agent has a schedule). A paused agent's tick counts: beat sent it."""
    schedules = [s for s in (a.parsed_schedule for a in services.config.agents.values()) if s is not None]
    last = cast(str | None, services.redis.get(keys.last_tick()))  # decode_responses: str, never bytes
    leader = cast(str | None, services.redis.get(keys.beat_leader()))
    if not schedules:
        return Check("beat", GREEN, "no scheduled agents")
    if not last:
        return Check("beat", AMBER, "beat has not ticked yet" + ("" if leader else "; no beat leader"))
    ticked = datetime.fromisoformat(last)
    age = (now - ticked).total_seconds()
    # The first slot any agent had after the last tick: a */15 schedule may be quiet for 15 minutes.
    local = ticked.astimezone(ZoneInfo(services.config.fleet.timezone))
    missed = min(schedule.next_after(local) for schedule in schedules)
    late = (now - missed).total_seconds()
    if late > BEAT_SILENT_S:
        return Check("beat", RED, f"last tick {age:.0f}s ago; the slot due at {missed.isoformat(timespec='seconds')} "
                                  f"is {late:.0f}s late" + ("" if leader else "; no beat leader holds the lease"))
    return Check("beat", GREEN, f"last tick {age:.0f}s ago, leader {leader or 'unknown'}")


def stuck_check(services: Services, session: Session, now: datetime) -> Check:
    """Runs still running well past their timeout."""
    stuck = []
    for run in session.exec(select(Run).where(Run.status == RunStatus.RUNNING)):
        spec = services.config.agents.get(run.agent)
        fleet = services.config.fleet
        limit = (spec.timeout_s if spec else 3600) + fleet.kill_grace_s + fleet.lease_ttl_s
        if run.started_at and now - run.started_at > timedelta(seconds=limit + 60):
            stuck.append(run.id)
    if stuck:
        return Check("stuck_runs", RED, f"{len(stuck)} run(s) past timeout + grace: {', '.join(stuck[:5])}")
    return Check("stuck_runs", GREEN, "none")


def backlog_check(client: redis.Redis) -> Check:
    """Queue depths (a deep queue with canaries coming back is busy, not broken)."""
    depths = {q: int(client.llen(q)) for q in QUEUES}
    deep = {q: d for q, d in depths.items() if d > 1000}
    if deep:
        return Check("backlog", AMBER, f"deep queues: {deep}")
    return Check("backlog", GREEN, f"depths {depths}")


def tenancy_check(services: Services) -> Check:
    """This fleet's mark on its Redis database, renewed (fleet/tenancy.py): red when another fleet's holds it."""
    try:
        other = tenancy.claim(services.redis, services.fleet_id)
    except (LookupError, SQLAlchemyError) as exc:
        return Check("redis_owner", AMBER, f"this fleet's id could not be read: {first_line(exc)}")
    if other is not None:
        return Check("redis_owner", RED, other.describe())
    return Check("redis_owner", GREEN, "this fleet's alone")


def dlq_check(session: Session, now: datetime) -> Check:
    """Dead letters in the last hour."""
    recent = session.exec(select(func.count()).select_from(DeadLetter)
                          .where(col(DeadLetter.created_at) > now - timedelta(hours=1))).one()
    total = session.exec(select(func.count()).select_from(DeadLetter)).one()
    if recent:
        return Check("dead_letters", AMBER, f"{recent} new in the last hour ({total} in all): fleet dlq list")
    return Check("dead_letters", GREEN, f"{total} in all, none new")


def spend_check(services: Services, session: Session) -> Check:
    """Scopes at or near their daily cap."""
    day = ledger.budget_day(session, services.config.fleet.timezone)
    caps = {keys.GLOBAL: services.config.fleet.daily_cap_usd} | {
        n: a.daily_cap_usd for n, a in services.config.agents.items()}
    near = []
    for row in ledger.day_rows(session, day=day):
        cap = ledger.to_micros(caps.get(row.scope))
        if cap:
            used = row.spent_micros + row.reserved_micros
            if used >= 0.9 * cap:
                near.append(f"{row.scope} {100 * used / cap:.0f}%")
    if near:
        return Check("spend", AMBER, "near or at cap: " + ", ".join(near))
    return Check("spend", GREEN, "below 90% of every cap")


def kill_check(session: Session) -> Check:
    """Whether a kill switch is engaged (amber: intended, but nothing runs)."""
    engaged = killswitch.engaged(session)
    if engaged:
        return Check("kill_switch", AMBER, "engaged: " + ", ".join(f"{k.scope} ({k.reason or 'no reason'})"
                                                                     for k in engaged))
    return Check("kill_switch", GREEN, "released")


def breaker_states(services: Services) -> dict[str, dict[str, str]]:
    """Every agent's breaker hash (Redis only: read before any database session opens)."""
    return services.breakers.states(list(services.config.agents))


def breaker_check(services: Services, session: Session, states: dict[str, dict[str, str]],
                  now: datetime) -> Check:
    """Open and half-open breakers. A half-open trial whose run has ended (or is gone) can never report, and
    would keep the breaker refusing every dispatch: it is freed here. One running past its timeout is red."""
    open_ = [name for name, state in states.items() if state.get("state") == "open"]
    half = {name: state.get("trial") or "" for name, state in states.items() if state.get("state") == "half_open"}
    freed, stuck = [], []
    for name, trial in half.items():
        run = session.get(Run, trial) if trial else None
        if trial and (run is None or run.status in TERMINAL):
            services.breakers.forfeit(name, trial)
            freed.append(f"{name} (trial {trial} {'gone' if run is None else 'ended ' + run.status})")
        elif run is not None and _past_its_timeout(services, run, now):
            stuck.append(f"{name} (trial {trial} running past its timeout)")
    if stuck:
        return Check("breakers", RED, f"half-open with a trial that does not end: {'; '.join(stuck)}")
    shown = [f"open: {', '.join(open_)}"] if open_ else []
    shown += [f"half-open: {', '.join(half)}"] if half else []
    shown += [f"freed the trial of {', '.join(freed)}"] if freed else []
    return Check("breakers", AMBER, "; ".join(shown)) if shown else Check("breakers", GREEN, "all closed")


def _past_its_timeout(services: Services, run: Run, now: datetime) -> bool:
    spec = services.config.agents.get(run.agent)
    fleet = services.config.fleet
    limit = (spec.timeout_s if spec else 3600) + fleet.kill_grace_s + fleet.lease_ttl_s
    return run.status == RunStatus.RUNNING and run.started_at is not None and (
        now - run.started_at).total_seconds() > limit


def orphan_check(client: redis.Redis) -> Check:
    """Agent processes alive on a host whose run is over or owned by another attempt (the live form of the
    fault suite's I4): each host's last scan, which killed what it found."""
    found = {report.host: report.orphans for report in orphans.reports(client) if report.orphans}
    if found:
        listed = "; ".join(f"{host}: {', '.join(runs[:5])}" for host, runs in sorted(found.items()))
        return Check("orphans", RED, f"agents alive without a live run (killed by their host): {listed}")
    return Check("orphans", GREEN, "no orphaned agent on any reporting host")


def disk_checks(services: Services) -> list[Check]:
    """Free space where the logs and the SQLite database live."""
    places = {"logs": services.settings.log_dir}
    url = make_url(services.settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        places["database"] = Path(url.database).resolve().parent
    checks = []
    for name, path in places.items():
        probe = path if path.exists() else Path.cwd()
        free = shutil.disk_usage(probe).free
        status = RED if free < DISK_RED else AMBER if free < DISK_AMBER else GREEN
        checks.append(Check(f"disk:{name}", status, f"{free / 2**30:.1f} GiB free at {probe}"))
    return checks


# ---------------------------------------------------------------- healing


def heal(services: Services) -> list[str]:
    """Mend the known failures: orphaned leases, kill flags Redis lost, kill flags only Redis has."""
    healed = []
    scopes = [keys.GLOBAL, *services.config.agents]
    mirrored = killswitch.repair_mirror(services.engine, services.redis, scopes, services.now())
    if mirrored:
        healed.append(f"wrote the database mirror of {len(mirrored)} kill flag(s) only Redis held: "
                      + ", ".join(mirrored))
    with db.session(services.engine) as session:
        restored = killswitch.restore(session, services.redis)
        first_pass = latest(session) is None
    if restored:
        healed.append(f"restored {restored} kill flag(s) from the database")
    if services.redis.set(keys.redis_epoch(), services.now().isoformat(), nx=True) and not first_pass:
        reopened = reopen_breakers(services)
        healed.append("Redis had lost its data (epoch marker missing): marker set again"
                      + (f"; reopened the breaker of {', '.join(reopened)}" if reopened else ""))
        alerts.alert("redis_restart", f"Redis lost its data; {restored} kill flag(s) restored from the database",
                     level="warning", restored=restored, breakers_reopened=reopened)
    # The leases are read from Redis before the database session opens (see run_watchdog).
    held = services.leases.holders_of({name: spec.concurrency for name, spec in services.config.agents.items()})
    if held:
        with db.session(services.engine) as session:
            orphaned = [lease for lease in held if _lease_orphaned(session, lease)]
        for lease in orphaned:
            if services.leases.release(lease):  # fenced: a lease renewed meanwhile is not ours to drop
                healed.append(f"released orphaned lease {lease.key} of finished run {lease.run_id}")
    return healed


def reopen_breakers(services: Services) -> list[str]:
    """The breakers still cooling down by the database's record (each transition leaves a `breaker.*` event),
    opened again in Redis after it lost them: a lost one read `closed`, and an agent whose key was revoked ran
    again (found by review). Only events within the longest cool-down matter: an older open is half-open now."""
    fleet = services.config.fleet
    cooldowns = {name: spec.breaker_settings(fleet)[1] for name, spec in services.config.agents.items()}
    if not cooldowns:
        return []
    with db.session(services.engine) as session:
        now = ledger.database_now(session)
        since = now - timedelta(seconds=max(cooldowns.values()))
        rows = session.exec(select(RunEvent.agent, RunEvent.kind, RunEvent.at)
                            .where(col(RunEvent.kind).in_(_BREAKER_EVENTS), col(RunEvent.at) > since)
                            .order_by(col(RunEvent.id))).all()
    latest = {agent: (kind, at) for agent, kind, at in rows if agent in cooldowns}
    reopened = []
    for agent, (kind, at) in sorted(latest.items()):
        age = (now - ledger.as_database_time(at)).total_seconds()
        if kind == "breaker.open" and age < cooldowns[agent] and services.breakers.reopen(agent, age_s=age):
            reopened.append(agent)
    return reopened


_BREAKER_EVENTS = ["breaker.open", "breaker.half_open", "breaker.closed"]


def _lease_orphaned(session: Session, lease: Lease) -> bool:
    run = session.get(Run, lease.run_id)
    return run is None or run.status in (RunStatus.SUCCEEDED, RunStatus.IDLE, RunStatus.KILLED, RunStatus.ARCHIVED,
                                         RunStatus.DEAD, RunStatus.FAILED)


def latest(session: Session) -> WatchdogVerdict | None:
    """The newest stored verdict."""
    return session.exec(select(WatchdogVerdict).order_by(col(WatchdogVerdict.id).desc()).limit(1)).first()
