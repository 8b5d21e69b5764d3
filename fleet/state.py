"""The fleet at a glance: one JSON picture for `fleet status --json`, `/api/state`, the web page and
`fleet up`'s status block; and the history the page draws (`history`)."""

from __future__ import annotations

import datetime as dt
import json
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import redis
from sqlalchemy import func, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet import charts, db, keys, killswitch, ledger, orphans, pause, store, watchdog
from fleet.errors import BadInputError, PermissionDeniedError
from fleet.keys import GLOBAL
from fleet.models import DeadLetter, Run, RunStatus
from fleet.services import Services, as_fleet_error


def spend_report(services: Services, day: str | None = None) -> dict[str, Any]:
    """Per-scope spend for a day (today by default), reserved and actual, against the caps."""
    with db.session(services.engine) as session:
        if day is None:
            day = ledger.budget_day(session, services.config.fleet.timezone)
        else:
            try:
                dt.date.fromisoformat(day)
            except ValueError:
                raise BadInputError(f"--day must be YYYY-MM-DD, got {day!r}") from None
        rows = {r.scope: r for r in ledger.day_rows(session, day=day)}
    caps = _caps(services)
    scopes = []
    for scope in sorted(set(caps) | set(rows), key=lambda s: (s != GLOBAL, s)):
        row = rows.get(scope)
        spent, reserved, runs = (row.spent_micros, row.reserved_micros, row.runs) if row else (0, 0, 0)
        cap = caps.get(scope)
        scopes.append({"scope": scope, "spent_usd": spent / 1e6, "reserved_usd": reserved / 1e6, "cap_usd": cap,
                       "left_usd": None if cap is None else round(cap - (spent + reserved) / 1e6, 6),
                       "spent_micros": spent, "reserved_micros": reserved, "runs": runs})
    return {"day": day, "timezone": services.config.fleet.timezone, "scopes": scopes}


def _caps(services: Services) -> dict[str, float | None]:
    agents = services.config.agents
    return {GLOBAL: services.config.fleet.daily_cap_usd} | {name: a.daily_cap_usd for name, a in agents.items()}


def snapshot(services: Services) -> dict[str, Any]:
    """Everything an operator needs in one look; Redis being down is reported, not raised."""
    now = services.now()
    with db.session(services.engine) as session:
        picture: dict[str, Any] = {
            "at": now.isoformat(),
            "kill": [_kill_json(k) for k in killswitch.engaged(session)],
            "runs_24h": store.count_by_status(session=session, since=now - timedelta(hours=24)),
            "running": [_running_json(r) for r in session.exec(select(Run).where(Run.status == RunStatus.RUNNING))],
            "queued": session.exec(select(func.count()).select_from(Run).where(Run.status == RunStatus.QUEUED)).one(),
            "recent": [_recent_json(r) for r in store.list_runs(session=session, limit=20)],
            "dlq_depth": session.exec(select(func.count()).select_from(DeadLetter)).one(),
            "dead_letters": [_dead_json(d) for d in store.list_dead_letters(session=session, limit=10)],
            "watchdog": _verdict_json(session),
        }
    picture["spend"] = spend_report(services)
    picture |= _redis_part(services)
    if picture["redis"] == "ok":
        picture["kill"] += _unmirrored_kills(services, {k["scope"] for k in picture["kill"]}, now)
    picture["pauses"] = _pauses(services, picture["redis"] == "ok")
    picture["paused"] = {p["scope"]: p["reason"] or "paused" for p in picture["pauses"]}
    return picture


def _pauses(services: Services, redis_ok: bool) -> list[dict[str, Any]]:
    """Every pause in force (a pause stops intake; a kill also stops what runs: they are shown apart)."""
    scopes = [GLOBAL, *services.config.agents]
    with db.session(services.engine) as session:
        try:
            found = pause.paused(session, services.redis if redis_ok else None, scopes)
        except (redis.RedisError, UnicodeDecodeError):
            found = pause.paused(session, None, scopes)
    return [{"scope": p.scope, "reason": p.reason, "actor": p.actor, "since": p.at.isoformat() if p.at else None}
            for p in found]


def _unmirrored_kills(services: Services, mirrored: set[str], now: dt.datetime) -> list[dict[str, Any]]:
    """Kill flags only Redis holds (a mirror write that failed, a flag set by hand): in force all the same,
    so shown as kills until the watchdog has mirrored them."""
    scopes = [s for s in (GLOBAL, *services.config.agents) if s not in mirrored]
    try:
        values = services.redis.mget([keys.kill(s) for s in scopes]) if scopes else []
    except (redis.RedisError, UnicodeDecodeError):
        return []
    flags = [killswitch.parse_flag(s, v) for s, v in zip(scopes, values, strict=True) if v is not None]
    return [{"scope": f.scope, "reason": f.reason, "actor": f.actor, "hard": f.hard,
             "since": (f.at or now).isoformat(), "mirrored": False} for f in flags]


def _redis_part(services: Services) -> dict[str, Any]:
    r = services.redis
    agents = list(services.config.agents)
    try:
        return {
            "redis": "ok",
            "queues": {q: int(r.llen(q)) for q in watchdog.QUEUES},
            "breakers": services.breakers.states(agents),
            "canaries": {q: {"sent": r.get(keys.canary_sent(q)), "back": r.get(keys.canary(q)),
                             "seen": r.get(keys.canary_seen(q))} for q in watchdog.QUEUES},
            "beat": {"leader": r.get(keys.beat_leader()), "last_tick": r.get(keys.last_tick())},
            "orphans": {report.host: len(report.orphans) for report in orphans.reports(r)},
        }
    except redis.RedisError as exc:
        # Refused credentials are told apart: `fleet status` exits 77 for them (retrying never helps), 75 for down.
        said = "refused the credentials" if isinstance(as_fleet_error(exc), PermissionDeniedError) else "unreachable"
        return {"redis": f"{said}: {exc.__class__.__name__}"}


def _kill_json(k: Any) -> dict[str, Any]:
    return {"scope": k.scope, "reason": k.reason, "actor": k.actor, "hard": k.hard, "since": k.changed_at.isoformat(),
            "mirrored": True}


def _running_json(r: Run) -> dict[str, Any]:
    return {"run_id": r.id, "agent": r.agent, "attempt": r.attempt, "host": r.host, "pid": r.pid,
            "started_at": r.started_at.isoformat() if r.started_at else None}


def _recent_json(r: Run) -> dict[str, Any]:
    return {"run_id": r.id, "agent": r.agent, "status": str(getattr(r.status, "value", r.status)),
            "attempt": r.attempt, "exit_code": r.exit_code, "cost_usd": r.cost_micros / 1e6,
            "created_at": r.created_at.isoformat(), "error": r.error}


def _dead_json(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "agent": d.agent, "run_id": d.run_id, "reason": d.reason, "attempts": d.attempts,
            "exit_code": d.exit_code, "error": d.last_error, "created_at": d.created_at.isoformat(),
            "replayed_run_id": d.replayed_run_id}


def _verdict_json(session: Session) -> dict[str, Any] | None:
    verdict = watchdog.latest(session)
    if verdict is None:
        return None
    return {"status": verdict.status, "at": verdict.at.isoformat(), "host": verdict.host,
            "checks": json.loads(verdict.checks)}


# ---------------------------------------------------------------- the page's pictures

HISTORY_ROWS = 20_000  # runs read for the pictures at most: a busy day's worth, bounded
DURATIONS_PER_AGENT = 300  # the newest of each agent's runs drawn as dots


def history(services: Services) -> dict[str, Any]:
    """What the page's pictures show: today's spend steps per scope against its cap, finished runs per
    hour by outcome over the last 24 h, and finished runs' durations per agent."""
    now = services.now()
    zone = ZoneInfo(services.config.fleet.timezone)
    since = now - timedelta(hours=24)
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
        spent = {row.scope: row.spent_micros / 1e6 for row in ledger.day_rows(session, day=day)}
        query = (sa_select(col(Run.agent), col(Run.status), col(Run.started_at), col(Run.finished_at),
                           col(Run.cost_micros), col(Run.budget_day))
                 .where(or_(col(Run.finished_at) >= since, col(Run.budget_day) == day))
                 .order_by(col(Run.finished_at).desc()).limit(HISTORY_ROWS))
        rows = [tuple(row) for row in session.execute(query)]
    start = datetime.combine(dt.date.fromisoformat(day), dt.time(), zone)
    return {"day": day, "start": start, "end": start + timedelta(days=1), "now": now,
            "spend": _spend_steps(services, rows, day, now, spent), "hours": _per_hour(rows, now, zone),
            "durations": _durations(rows, since)}


def _spend_steps(services: Services, rows: list[Any], day: str, now: datetime,
                 spent: dict[str, float]) -> list[charts.SpendSeries]:
    caps = _caps(services)
    steps: dict[str, list[tuple[datetime, float]]] = {}
    for agent, _status, _started, finished, cost, budget_day in sorted(rows, key=lambda r: r[3] or now):
        if budget_day != day or not cost:
            continue
        for scope in (GLOBAL, agent):
            series = steps.setdefault(scope, [])
            series.append((finished or now, (series[-1][1] if series else 0.0) + cost / 1e6))
    shown = [s for s in caps if s == GLOBAL or caps[s] is not None or spent.get(s)]
    return [charts.SpendSeries("whole fleet" if s == GLOBAL else s, steps.get(s, []), caps.get(s), spent.get(s, 0.0))
            for s in shown]


def _per_hour(rows: list[Any], now: datetime, zone: ZoneInfo) -> list[tuple[datetime, dict[str, int]]]:
    """24 local hours ending with the current one, each with its finished runs counted by outcome."""
    current = now.astimezone(zone).replace(minute=0, second=0, microsecond=0)
    hours = [current - timedelta(hours=23 - i) for i in range(24)]
    counts: list[dict[str, int]] = [{} for _ in hours]
    for _agent, status, _started, finished, _cost, _day in rows:
        if finished is None:
            continue
        index = 23 - int((current - finished.astimezone(zone).replace(minute=0, second=0, microsecond=0))
                         .total_seconds() // 3600)
        if 0 <= index < 24:
            name = str(getattr(status, "value", status))
            counts[index][name] = counts[index].get(name, 0) + 1
    return list(zip(hours, counts, strict=True))


def _durations(rows: list[Any], since: datetime) -> dict[str, list[tuple[float, str]]]:
    per_agent: dict[str, list[tuple[float, str]]] = {}
    for agent, status, started, finished, _cost, _day in rows:  # newest first
        if started is None or finished is None or finished < since:
            continue
        runs = per_agent.setdefault(agent, [])
        if len(runs) < DURATIONS_PER_AGENT:
            runs.append((max(0.0, (finished - started).total_seconds()), str(getattr(status, "value", status))))
    return per_agent
